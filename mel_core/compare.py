"""The A/B harness: GRPO against MEL on identical data, seeds and budgets, and the statistics of the result.

Arms. For each of S seeds (run.seed = base seed + i) both arms run a whole campaign from the same
config; they differ only in what MEL adds:

- ``grpo``: experience.enabled = false (no pair / diagnose / abstract / replay) and loss.nll_coef = 0;
- ``mel``: experience.enabled = true with the configured lambda (loss.nll_coef > 0).

Both arms start from the same checkpoint (the tiny warm start is cached under one key, or the same
base model), and a step's problems and sampling seed derive from (run.seed, step) only, so at each
seed the two arms train on the same problems in the same order (:func:`identical_problems` checks
it from the stores). Each arm is evaluated on eval.datasets at the base, every eval.every_n_steps
(if 0: only base and last) and at the last step.

Statistics. The headline is the final held-out greedy Pass@1 difference MEL - GRPO on the first
dataset (every dataset is reported). Its 95% CI is a paired, crossed bootstrap
(:func:`paired_bootstrap`): the data are the per-(seed, problem) differences
d[s, p] = reward_MEL[s, p] - reward_GRPO[s, p] (the same seed and problem in both arms, which is the
pairing); each resample draws S seeds and P problems with replacement, independently, and takes the
mean of d over the drawn seeds x drawn problems. Seeds carry the training randomness and problems the
test-set sampling, so both are resampling units. The crossed bootstrap counts the cell-level noise in
both draws, so it is conservative when seed and problem effects are small (on simulated binary
outcomes, 3 seeds x 100-400 problems, a nominal 95% interval covered the true difference 98-100% of
the time); with few seeds (S = 3) its seed part is coarse, so read it as an honest but rough bound.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mel_core import config as config_mod
from mel_core.config import ConfigError, MelConfig
from mel_core.stage_names import STAGES
from mel_core.store import StoreReader
from mel_core.summary import step_summary

ARMS = ("grpo", "mel")
BOOTSTRAP_RESAMPLES = 10_000
CI_LEVEL = 0.95
RESAMPLING = ("paired crossed bootstrap: seeds and problems resampled independently with replacement; "
              "statistic = mean of (MEL - GRPO) greedy reward over the drawn seeds x problems")


# ------------------------------------------------------------------------------------------ arms


@dataclass(frozen=True)
class Arm:
    arm: str  # 'grpo' | 'mel'
    seed: int
    config: MelConfig


def arm_config(cfg: MelConfig, name: str, arm: str, seed: int) -> MelConfig:
    """The campaign config of one arm at one seed: run `<name>-<arm>-s<seed>`, everything else shared."""
    d = config_mod.to_dict(cfg)
    d["run"].update(name=f"{name}-{arm}-s{seed}", seed=seed)
    if arm == "grpo":
        d["experience"]["enabled"] = False
        d["loss"]["nll_coef"] = 0.0
    elif arm == "mel":
        d["experience"]["enabled"] = True
    else:
        raise ValueError(f"unknown arm {arm!r}; one of {ARMS}")
    d["eval"]["every_n_steps"] = eval_every(cfg)
    return config_mod.from_dict(d)


def eval_every(cfg: MelConfig) -> int:
    """The arms' evaluation interval: eval.every_n_steps, or (if 0) only the base and the last step."""
    return cfg.eval.every_n_steps if cfg.eval.every_n_steps > 0 else max(cfg.run.steps, 1)


def plan(cfg: MelConfig, name: str, seeds: int) -> list[Arm]:
    """Every (arm, seed) campaign, seed by seed; the arm that goes first alternates, so neither arm always
    pays a process's first-generation warm-up in its timings."""
    if seeds < 1:
        raise ConfigError("compare: --seeds must be >= 1")
    if not cfg.eval.datasets:
        raise ConfigError("config key 'eval.datasets': compare needs a held-out dataset (e.g. [synthetic])")
    if not cfg.eval.greedy:
        raise ConfigError("config key 'eval.greedy': compare reports greedy Pass@1; it must be true")
    if cfg.loss.nll_coef <= 0:
        raise ConfigError("config key 'loss.nll_coef': the MEL arm needs lambda > 0")
    out = []
    for i in range(seeds):
        seed = cfg.run.seed + i
        order = ARMS if i % 2 == 0 else ARMS[::-1]
        out += [Arm(arm, seed, arm_config(cfg, name, arm, seed)) for arm in order]
    return out


@dataclass
class ArmRun:
    """Where a finished arm's records are."""
    arm: str
    seed: int
    run_name: str
    run_id: str
    db: str
    final_checkpoint_id: str


# ------------------------------------------------------------------------------------ statistics


def paired_bootstrap(diff, n_resamples: int = BOOTSTRAP_RESAMPLES, level: float = CI_LEVEL, seed: int = 0) -> dict:
    """Mean and percentile CI of d[s, p] (seeds x problems), resampling seeds and problems independently.

    A resample's statistic is w_s^T d w_p, where w_s / w_p are multinomial draw counts over seeds /
    problems divided by S / P: the mean of d over the drawn seeds x drawn problems (vectorised).
    """
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"need a non-empty seeds x problems matrix, got shape {d.shape}")
    S, P = d.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // max(P, 1))  # bounds memory of the problem weights at large P
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        ws = rng.multinomial(S, np.full(S, 1 / S), size=b) / S  # [b, S]
        wp = rng.multinomial(P, np.full(P, 1 / P), size=b) / P  # [b, P]
        stats[start:start + b] = np.einsum("bp,bp->b", ws @ d, wp)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level,
            "n_seeds": S, "n_problems": P, "n_resamples": n_resamples, "resampling": RESAMPLING}


# -------------------------------------------------------------------------------- reading the runs


def _final_greedy(store: StoreReader, run: ArmRun, dataset: str) -> dict[str, float]:
    rows = store.query("SELECT problem_id, reward FROM eval_samples WHERE run_id = ? AND checkpoint_id = ? "
                       "AND dataset = ? AND greedy", [run.run_id, run.final_checkpoint_id, dataset])
    return {r["problem_id"]: r["reward"] for r in rows}


def _run_records(run: ArmRun) -> dict:
    """Per-step metrics and seconds, held-out metrics at eval points, final greedy rewards per problem."""
    with StoreReader(run.db) as store:
        steps = [s["step"] for s in store.query("SELECT DISTINCT step FROM metrics WHERE run_id = ? ORDER BY step",
                                                [run.run_id])]
        per_step = []
        for step in steps:
            s = step_summary(store, run.run_id, step)
            secs = s.pop("stage_seconds")
            per_step.append({**s, "seconds": sum(secs.get(st, 0.0) for st in STAGES),
                             "stage_seconds": {st: secs[st] for st in STAGES if st in secs}})
        heldout = store.query("SELECT dataset, step, pass_at_1, avg_at_k, pass_at_k, k, num_problems "
                              "FROM heldout_accuracy WHERE run_id = ? ORDER BY dataset, step", [run.run_id])
        datasets = sorted({h["dataset"] for h in heldout})
        final = {ds: _final_greedy(store, run, ds) for ds in datasets}
        prompts = store.query("SELECT step, position, problem_id FROM prompts WHERE run_id = ? ORDER BY step, "
                              "position", [run.run_id])
    return {"steps": per_step, "heldout": heldout, "final_greedy": final,
            "prompts": [(p["step"], p["position"], p["problem_id"]) for p in prompts]}


def identical_problems(records: dict[tuple[str, int], dict], seeds: list[int]) -> bool:
    """At every seed, both arms trained on the same problems at the same steps and positions."""
    return all(records[("grpo", s)]["prompts"] == records[("mel", s)]["prompts"] for s in seeds)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _curves(records: dict, arm: str, seeds: list[int]) -> list[dict]:
    """Per step, the mean over seeds of reward, mixed-group fraction, accepted, retention and seconds."""
    by_step: dict[int, list[dict]] = {}
    for s in seeds:
        for row in records[(arm, s)]["steps"]:
            by_step.setdefault(row["step"], []).append(row)
    out = []
    for step, rows in sorted(by_step.items()):
        mixed_frac = [r["mixed_groups"] / r["groups"] for r in rows if r.get("groups")]
        out.append({"step": step, "seeds": len(rows), "reward_mean": _mean(r.get("reward_mean") for r in rows),
                    "mixed_groups": _mean(r.get("mixed_groups") for r in rows), "mixed_fraction": _mean(mixed_frac),
                    "accepted": _mean(r.get("accepted") for r in rows),
                    "retention_ratio": _mean(r.get("retention_ratio") for r in rows),
                    "seconds": _mean(r["seconds"] for r in rows)})
    return out


def _heldout_curve(records: dict, arm: str, seeds: list[int], dataset: str) -> list[dict]:
    by_step: dict[int, list[dict]] = {}
    for s in seeds:
        for h in records[(arm, s)]["heldout"]:
            if h["dataset"] == dataset:
                by_step.setdefault(h["step"], []).append(h)
    return [{"step": step, "seeds": len(rows), "pass_at_1": _mean(h["pass_at_1"] for h in rows),
             "avg_at_k": _mean(h["avg_at_k"] for h in rows), "pass_at_k": _mean(h["pass_at_k"] for h in rows)}
            for step, rows in sorted(by_step.items())]


def _final_difference(records: dict, seeds: list[int], dataset: str, n_resamples: int) -> dict:
    finals = {(arm, s): records[(arm, s)]["final_greedy"].get(dataset, {}) for arm in ARMS for s in seeds}
    problem_sets = {frozenset(f) for f in finals.values()}
    if len(problem_sets) != 1 or not next(iter(problem_sets)):
        raise ValueError(f"{dataset}: the arms' final evaluations do not cover the same problems")
    problems = sorted(next(iter(problem_sets)))
    mel = np.array([[finals[("mel", s)][p] for p in problems] for s in seeds])  # [S, P]
    grpo = np.array([[finals[("grpo", s)][p] for p in problems] for s in seeds])  # [S, P]
    boot = paired_bootstrap(mel - grpo, n_resamples)
    return {"dataset": dataset, "grpo_pass_at_1": float(grpo.mean()), "mel_pass_at_1": float(mel.mean()),
            "grpo_per_seed": grpo.mean(axis=1).tolist(), "mel_per_seed": mel.mean(axis=1).tolist(),
            "difference": boot["mean"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "bootstrap": boot}


def _wall_time(records: dict, arm: str, seeds: list[int]) -> dict:
    rows = [r for s in seeds for r in records[(arm, s)]["steps"]]
    per_stage = {st: _mean(r["stage_seconds"].get(st) for r in rows) for st in STAGES}
    return {"seconds_per_step": _mean(r["seconds"] for r in rows), "steps_timed": len(rows),
            "stage_seconds_per_step": {k: v for k, v in per_stage.items() if v is not None}}


def build_report(runs: list[ArmRun], *, name: str, command: str, config: MelConfig, datasets: list[str],
                 n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Every number of the A/B, read back from the arms' stores (the JSON that `mel compare` writes)."""
    records = {(r.arm, r.seed): _run_records(r) for r in runs}
    seeds = sorted({r.seed for r in runs})
    missing = [(a, s) for a in ARMS for s in seeds if (a, s) not in records]
    if missing:
        raise ValueError(f"compare: arms missing from the runs: {missing}")
    finals = [_final_difference(records, seeds, ds, n_resamples) for ds in datasets]
    wall = {arm: _wall_time(records, arm, seeds) for arm in ARMS}
    g, m = wall["grpo"]["seconds_per_step"], wall["mel"]["seconds_per_step"]
    return {
        "name": name, "command": command, "seeds": seeds, "steps": config.run.steps,
        "prompts_per_step": config.sampling.prompts_per_step, "group_size": config.sampling.group_size,
        "eval": {"datasets": datasets, "every_n_steps": eval_every(config), "k": config.eval.k,
                 "temperature": config.eval.temperature, "max_problems": config.eval.max_problems},
        "identical_problems": identical_problems(records, seeds),
        "runs": [{"arm": r.arm, "seed": r.seed, "run_name": r.run_name, "run_id": r.run_id, "db": r.db,
                  "final_checkpoint_id": r.final_checkpoint_id} for r in runs],
        "curves": {arm: _curves(records, arm, seeds) for arm in ARMS},
        "heldout": {ds: {arm: _heldout_curve(records, arm, seeds, ds) for arm in ARMS} for ds in datasets},
        "final": finals[0], "final_by_dataset": finals,
        "wall_time": {**wall, "mel_over_grpo": (m / g) if g and m else None},
    }


# ---------------------------------------------------------------------------------------- report


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def write_plots(report: dict, out_dir: str | Path, stem: str) -> dict[str, str]:
    """PNG curves of the A/B beside its markdown: training reward, held-out greedy Pass@1 per dataset, and
    MEL's accepted meta-experiences and retention. Returns {what: file name} for the plots drawn."""
    from mel_core.report import line_plot

    out_dir = Path(out_dir)
    curves, plots = report["curves"], {}

    def series(rows, key):
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None]

    def draw(what, title, ylabel, lines, ylim=None):
        path = out_dir / f"{stem}-{what}.png"
        if line_plot(path, title, ylabel, lines, ylim):
            plots[what] = path.name

    draw("reward", "Training reward at T=1 (mean over seeds)", "reward",
         {arm.upper(): series(curves[arm], "reward_mean") for arm in ARMS}, (0, 1))
    for ds, arms in report["heldout"].items():
        draw(f"heldout-{ds}", f"Held-out greedy Pass@1: {ds} (mean over seeds)", "Pass@1",
             {arm.upper(): series(arms[arm], "pass_at_1") for arm in ARMS}, (0, 1))  # full scale: no zoomed gaps
    draw("mel-acceptance", "MEL: accepted meta-experiences and retention (mean over seeds)", "per step",
         {"accepted": series(curves["mel"], "accepted"), "retention ratio": series(curves["mel"], "retention_ratio")})
    return plots


def format_markdown(report: dict) -> str:
    r, fin = report, report["final"]
    pct = f"{round(fin['bootstrap']['level'] * 100)}%"
    lines = [f"# GRPO vs MEL: {r['name']}", "",
             "Command:", "", "```", r["command"], "```", "",
             f"{len(r['seeds'])} seed(s) {r['seeds']} x 2 arms; {r['steps']} steps of B={r['prompts_per_step']} "
             f"prompts x G={r['group_size']}; both arms start from the same checkpoint. Identical problems per step "
             f"in both arms at every seed: **{'yes' if r['identical_problems'] else 'NO'}**.",
             f"Held-out: {', '.join(r['eval']['datasets'])} (greedy Pass@1; Avg@{r['eval']['k']} / "
             f"Pass@{r['eval']['k']} at T={r['eval']['temperature']}; "
             f"{r['eval']['max_problems'] or 'all'} problems per dataset).", ""]
    for f in r["final_by_dataset"]:
        lines += [f"## Final held-out Pass@1 (greedy): {f['dataset']}", "",
                  "| arm | Pass@1 (mean over seeds) | per seed |", "|---|---|---|",
                  f"| GRPO | {_f(f['grpo_pass_at_1'])} | {', '.join(_f(x) for x in f['grpo_per_seed'])} |",
                  f"| MEL | {_f(f['mel_pass_at_1'])} | {', '.join(_f(x) for x in f['mel_per_seed'])} |", "",
                  f"**MEL - GRPO = {f['difference']:+.3f}**, {pct} CI [{f['ci_low']:+.3f}, {f['ci_high']:+.3f}] "
                  f"({f['bootstrap']['n_seeds']} seeds x {f['bootstrap']['n_problems']} problems, "
                  f"{f['bootstrap']['n_resamples']} resamples; {f['bootstrap']['resampling']}).", ""]
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{what}]({name})" for what, name in report["plots"].items()] + [""]
    lines += ["## Per-step training curves (mean over seeds)", "",
              "| step | GRPO reward | MEL reward | GRPO mixed groups | MEL mixed groups | MEL accepted | MEL retention |",
              "|---|---|---|---|---|---|---|"]
    mel_by_step = {c["step"]: c for c in r["curves"]["mel"]}
    for g in r["curves"]["grpo"]:
        m = mel_by_step.get(g["step"], {})
        lines.append(f"| {g['step']} | {_f(g['reward_mean'])} | {_f(m.get('reward_mean'))} | "
                     f"{_f(g['mixed_groups'], '{:.1f}')} | {_f(m.get('mixed_groups'), '{:.1f}')} | "
                     f"{_f(m.get('accepted'), '{:.1f}')} | {_f(m.get('retention_ratio'), '{:.2f}')} |")
    for ds, arms in r["heldout"].items():
        lines += ["", f"## Held-out Pass@1 at evaluation points: {ds} (mean over seeds)", "",
                  "| step | GRPO Pass@1 | MEL Pass@1 | GRPO Avg@k | MEL Avg@k |", "|---|---|---|---|---|"]
        mel_by_step = {h["step"]: h for h in arms["mel"]}
        for g in arms["grpo"]:
            m = mel_by_step.get(g["step"], {})
            lines.append(f"| {g['step']} | {_f(g['pass_at_1'])} | {_f(m.get('pass_at_1'))} | "
                         f"{_f(g['avg_at_k'])} | {_f(m.get('avg_at_k'))} |")
    w = r["wall_time"]
    lines += ["", "## Wall time per training step (sample..update, mean over seeds and steps; evaluation excluded)", "",
              "| arm | s/step | " + " | ".join(STAGES) + " |", "|---|---|" + "---|" * len(STAGES)]
    for arm in ARMS:
        st = w[arm]["stage_seconds_per_step"]
        lines.append(f"| {arm.upper()} | {_f(w[arm]['seconds_per_step'], '{:.2f}')} | "
                     + " | ".join(_f(st.get(s), '{:.2f}') for s in STAGES) + " |")
    lines += ["", f"MEL / GRPO time per step: {_f(w['mel_over_grpo'], '{:.2f}')}x", "", "## Runs", "",
              "| arm | seed | run | DuckDB |", "|---|---|---|---|"]
    lines += [f"| {x['arm']} | {x['seed']} | {x['run_name']} ({x['run_id']}) | {x['db']} |" for x in r["runs"]]
    return "\n".join(lines) + "\n"


def command_line(argv: list[str]) -> str:
    """The exact `mel compare` invocation, shell-quoted, for the report."""
    return shlex.join(["mel", *argv])
