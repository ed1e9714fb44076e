"""`mel report RUN`: one run's markdown report with PNG plots, read from its DuckDB file.

What it shows, per step: reward mean, fraction of mixed groups, retention ratio, NLL, held-out accuracy
(table ``evals``; "no evaluations recorded" when there is none), seconds per stage (stacked bars of the
completed executions in ``stage_runs``), and the top clusters of the heuristic library
(mel_core.store.library). Every number comes from one query over the store; nothing is recomputed from
logs. Output: ``<run_dir>/report/report.md`` and its PNGs (matplotlib's Agg canvas, no display needed).

The report only reads (mel_core.store.reader.StoreReader): a store from before the heuristic library shows no
clusters, and a file that is not a mel store is named and left as it was.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from mel_core.config import LibraryConfig
from mel_core.run import refs
from mel_core.run.refs import RunRef
from mel_core.store import library, run_reads
from mel_core.store.reader import StoreReader
from mel_core.vocabulary import ALL_STAGES

REPORT_DIR = "report"
PLOTS = {"reward_mean", "mixed_fraction", "retention_ratio", "nll_loss", "heldout_accuracy", "stage_times"}


class ReportError(RuntimeError):
    pass


def resolve_run(run: str, runs_root: str | Path = "runs") -> RunRef:
    """RUN as a DuckDB path, a run directory, a run name under `runs_root`, or a run id found there
    (mel_core.run.refs.resolve_run; a report's failure is its own ReportError)."""
    try:
        return refs.resolve_run(run, runs_root)
    except refs.RunNotFound as e:
        raise ReportError(str(e)) from None


def _pick_run(store: StoreReader, ref: RunRef) -> dict:
    try:
        return refs.pick_run(store, ref)
    except refs.RunNotFound as e:
        raise ReportError(str(e)) from None


# ------------------------------------------------------------------------------------ the data


def _steps(store: StoreReader, run_id: str) -> list[dict]:
    """One row per step: the metrics the stages wrote (verify logs the mixed groups, also for GRPO-only runs)."""
    rows = run_reads.metrics_by_step(store, run_id)
    for row in rows:
        if row.get("groups"):
            row["mixed_fraction"] = row["mixed_groups"] / row["groups"]
    return rows


def collect(store: StoreReader, run: dict, top: int, threshold: float) -> dict:
    run_id = run["run_id"]
    return {
        "run": run,
        "threshold": threshold,
        "config": json.loads(run.get("config_json") or "{}"),
        "steps": [s for s in _steps(store, run_id) if s["step"] > 0],
        "stage_seconds": run_reads.stage_timings(store, run_id),
        "evals": run_reads.evaluation_curves(store, run_id),
        "library": library.summary(store, run_id),
        "clusters": library.top_clusters(store, run_id, top),
        "other_runs": run_reads.other_run_ids(store, run_id),
    }


# --------------------------------------------------------------------------------------- plots


def _figure(title: str, ylabel: str):
    from matplotlib.figure import (
        Figure,  # the Agg canvas, without pyplot's global state or a display
    )

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def line_plot(path: Path, title: str, ylabel: str, series: dict[str, list[tuple[int, float]]],
               ylim: tuple[float, float] | None = None) -> bool:
    """One line per series of (step, value); False (no file) when there is no point to draw."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, ax = _figure(title, ylabel)
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path)
    return True


def _stage_plot(path: Path, rows: list[dict], stages: list[str]) -> bool:
    from matplotlib.ticker import MaxNLocator

    steps = sorted({r["step"] for r in rows})
    if not steps:
        return False
    secs = {(r["step"], r["stage"]): r["seconds"] for r in rows}
    fig, ax = _figure("Seconds per stage (completed executions)", "seconds")
    bottom = [0.0] * len(steps)
    for stage in stages:
        heights = [secs.get((s, stage), 0.0) for s in steps]
        ax.bar(steps, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    fig.legend(loc="outside right upper", fontsize="small")  # beside the bars, never over them
    # whole steps, at most ~15 labels: a 60-step campaign's ticks stay readable
    ax.xaxis.set_major_locator(MaxNLocator(nbins=15, integer=True))
    fig.savefig(path)
    return True


# ------------------------------------------------------------------------------------ markdown


def fmt(v, digits: int = 3) -> str:
    """How numbers appear in the report (tests read them back): '-' for missing, ints as ints."""
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell_text(text: str) -> str:
    """Heuristic text as a markdown table cell: a code span (keeps '*' literal) with pipes escaped."""
    return "`" + " ".join((text or "").split()).replace("`", "'").replace("|", "\\|") + "`"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _stage_order(rows: list[dict]) -> list[str]:
    seen = {r["stage"] for r in rows}
    return [s for s in ALL_STAGES if s in seen] + sorted(seen - set(ALL_STAGES))


def render(data: dict, plots: dict[str, str]) -> str:
    """The report's markdown: a header, then one section per question a reader asks."""
    img = lambda key, alt: [f"![{alt}]({plots[key]})", ""] if key in plots else []
    out = _header(data)
    for section in (_curves_section, _heldout_section, _stage_section, _library_section):
        out += section(data, img)
    return "\n".join(out).rstrip() + "\n"


def _header(data: dict) -> list[str]:
    run, cfg, steps = data["run"], data["config"], data["steps"]
    get = lambda *keys: _dig(cfg, keys)
    exp_on = get("experience", "enabled")
    warm = sum(r["seconds"] for r in data["stage_seconds"] if r["step"] == 0)
    out = [f"# MEL report: `{run['name']}`", ""]
    out += _table(["", ""], [
        ["run id", f"`{run['run_id']}`"], ["config hash", f"`{run['config_hash']}`"],
        ["created", str(run["created_at"])[:19]], ["model", f"`{get('model', 'name_or_path')}`"],
        ["prompts x rollouts per step", f"{get('sampling', 'prompts_per_step')} x {get('sampling', 'group_size')}"],
        ["MEL stages", "-" if exp_on is None else ("on, λ = " + fmt(get("loss", "nll_coef")) if exp_on else "off (GRPO)")],
        ["steps recorded", f"{len(steps)}" + (f" ({steps[0]['step']}-{steps[-1]['step']})" if steps else "")],
        ["warm start / base load", f"{warm:.1f} s" if warm else "-"],
        ["report written", dt.datetime.now().strftime("%Y-%m-%d %H:%M")]])
    if data["other_runs"]:
        out += ["", f"The same file holds {len(data['other_runs'])} other run(s): "
                + ", ".join(f"`{r}`" for r in data["other_runs"]) + " (`mel report RUN_ID` for those)."]
    return out


def _curves_section(data: dict, img) -> list[str]:
    steps = data["steps"]
    out = ["", "## Training curves", ""]
    if not steps:
        return out + ["No step has been recorded yet.", ""]
    stage_total: dict[int, float] = {}
    for r in data["stage_seconds"]:
        stage_total[r["step"]] = stage_total.get(r["step"], 0.0) + r["seconds"]
    out += _table(["step", "reward mean", "mixed groups", "mixed fraction", "analyses", "candidates", "accepted",
                   "retention ratio", "NLL", "seconds"],
                  [[str(s["step"]), fmt(s.get("reward_mean")),
                    f"{s['mixed_groups']:.0f}/{s['groups']:.0f}" if s.get("groups") else "-",
                    fmt(s.get("mixed_fraction")), fmt(s.get("analyses")), fmt(s.get("candidates")),
                    fmt(s.get("accepted")), fmt(s.get("retention_ratio")), fmt(s.get("nll_loss")),
                    fmt(stage_total.get(s["step"]), 1)] for s in steps])
    out += ["", "Mixed groups are counted from the verified rollouts (at least one correct and one incorrect); "
            "the retention ratio is accepted / candidates (meta-experiences that reached replay); NLL is the "
            "update's loss on the accepted meta-experiences ('-' when there were none).", ""]
    for key, alt in (("reward_mean", "reward mean"), ("mixed_fraction", "fraction of mixed groups"),
                     ("retention_ratio", "retention ratio"), ("nll_loss", "NLL")):
        out += img(key, alt)
    return out


def _heldout_section(data: dict, img) -> list[str]:
    out = ["## Held-out accuracy", ""]
    if not data["evals"]:
        return out + ["No evaluations recorded for this run (`mel eval`, or `eval.every_n_steps` in the campaign).", ""]
    out += _table(["step", "dataset", "metric", "k", "temperature", "value"],
                  [[fmt(e["step"]), f"`{e['dataset']}`", e["metric"], fmt(e["k"]), fmt(e["temperature"], 2),
                    fmt(e["value"])] for e in data["evals"]])
    return out + [""] + img("heldout_accuracy", "held-out accuracy")


def _stage_section(data: dict, img) -> list[str]:
    out = ["## Time per stage", ""]
    per_stage: dict[str, list[float]] = {}
    for r in data["stage_seconds"]:
        if r["step"] > 0:
            per_stage.setdefault(r["stage"], []).append(r["seconds"])
    if not per_stage:
        return out + ["No completed stage recorded.", ""]
    total = sum(sum(v) for v in per_stage.values())
    out += _table(["stage", "total seconds", "share", "mean seconds per step"],
                  [[st, fmt(sum(per_stage[st]), 1), f"{100 * sum(per_stage[st]) / total:.1f}%" if total else "-",
                    fmt(sum(per_stage[st]) / len(per_stage[st]), 2)] for st in _stage_order(data["stage_seconds"])
                   if st in per_stage])
    return out + ["", "Summed over completed executions (a stage retried after a failure counts its successful run; "
                  "cached stages of a resumed campaign do not run again). The warm start (step 0) is in the table "
                  "above.", ""] + img("stage_times", "seconds per stage")


def _library_section(data: dict, img) -> list[str]:
    lib = data["library"]
    out = ["## Heuristic library", ""]
    if not lib["heuristics"]:
        return out + ["No heuristic has been written in this run.", ""]
    out += [f"{lib['heuristics']} heuristics in {lib['clusters']} clusters of near-duplicates "
            f"(text similarity >= {data['threshold']:g}, mel_core.store.library); {lib['accepted']} accepted, in "
            f"{lib['accepted_clusters']} clusters; {lib['internalized']} internalized. "
            f"Top {len(data['clusters'])} clusters by accepted, then produced:", ""]
    out += _table(["cluster", "produced", "accepted", "internalized", "texts", "steps", "representative"],
                  [[f"`{c['cluster_id']}`", fmt(c["produced"]), fmt(c["accepted"]), fmt(c["internalized"]),
                    fmt(c["distinct_texts"]), f"{c['first_step']}-{c['last_step']}", _cell_text(c["representative"])]
                   for c in data["clusters"]])
    return out + ["", "Every member of a cluster: `mel query \"SELECT * FROM heuristic_lineage WHERE cluster_id = "
                  "'...'\"`.", ""]


def _dig(d: dict, keys: tuple):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


# -------------------------------------------------------------------------------------- entry


def write_report(ref: RunRef, out_dir: str | Path | None = None, top: int = 10) -> Path:
    """Write report.md and its PNGs; returns the path of report.md. Reads the store, never writes it."""
    with StoreReader(ref.db) as store:
        run = _pick_run(store, ref)
        threshold = library.run_threshold(run.get("config_json"), LibraryConfig().similarity_threshold)
        data = collect(store, run, top, threshold)

    out = Path(out_dir) if out_dir else ref.db.parent / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}

    def plot(key: str, made: bool) -> None:
        if made:
            plots[key] = f"{key}.png"

    steps = data["steps"]
    pts = lambda k: [(s["step"], s[k]) for s in steps if s.get(k) is not None]
    plot("reward_mean", line_plot(out / "reward_mean.png", "Reward mean (training rollouts)", "reward",
                                   {"reward mean": pts("reward_mean")}, (0, 1)))
    plot("mixed_fraction", line_plot(out / "mixed_fraction.png", "Fraction of mixed groups", "fraction",
                                      {"mixed fraction": pts("mixed_fraction")}, (0, 1)))
    plot("retention_ratio", line_plot(out / "retention_ratio.png", "Retention ratio (accepted / candidates)",
                                       "ratio", {"retention ratio": pts("retention_ratio")}, (0, 1)))
    plot("nll_loss", line_plot(out / "nll_loss.png", "NLL of accepted meta-experience", "nats per token",
                                {"NLL": pts("nll_loss")}))
    series: dict[str, list] = {}
    for e in data["evals"]:
        if e["step"] is not None:
            label = f"{e['dataset']} {e['metric']}" + (f" (T={e['temperature']:g})" if e["temperature"] else "")
            series.setdefault(label, []).append((e["step"], e["value"]))
    plot("heldout_accuracy", line_plot(out / "heldout_accuracy.png", "Held-out accuracy", "accuracy", series, (0, 1)))
    stage_rows = [r for r in data["stage_seconds"] if r["step"] > 0]
    plot("stage_times", _stage_plot(out / "stage_times.png", stage_rows, _stage_order(stage_rows)))

    for stale in PLOTS - set(plots):  # from an earlier report of this run: no longer true
        (out / f"{stale}.png").unlink(missing_ok=True)
    path = out / "report.md"
    path.write_text(render(data, plots))
    return path
