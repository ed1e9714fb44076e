"""The A/B harness: arms that differ only in what they add to GRPO, on identical data, seeds and budgets, and
the statistics of their differences to GRPO.

Arms (``--arms``, any of ARMS, ``grpo`` always included as the baseline). For each of S seeds (run.seed = base
seed + i) every arm runs a whole campaign from the same config, changed only by its overrides:

- ``grpo``: no MEL stages, lambda = 0 — the baseline;
- ``mel``: MEL as configured (the paper);
- ``mel-oracle``: the embedded world writes the correct analysis of each incorrect rollout (uses world
  knowledge: does a correct lesson reach the solver at all?);
- ``mel-mismatched``: the oracle's analysis with each lesson swapped for another rule's of the nearest length
  (the extra-gradient control: as much NLL, on lessons that do not fit);
- ``mel-mismatched-weak``: the same, swapping only among the weak rules' lessons (experience.mismatch_pool:
  weak_rules): on the new-lesson warm start the loss-matched control (both lessons new text);
- ``grpo+sft``: GRPO plus NLL on correct rollouts of its own pairs given their solve prompts, as many at each step
  as the ``mel`` arm of the same seed accepted (the rejection-sampling baseline, count-matched). It runs no
  analysis, abstraction or replay — only pair — so its equal-time read-out does not pay for a pipeline it does not
  use: the harness runs ``mel`` first at each seed and points the arm at it (:func:`count_matched`;
  experience.count_match_run_id / count_match_store), so ``--arms`` must include ``mel``;
- ``mel-nofilter``: every parsed analysis kept (the replay runs, but does not filter);
- ``mel-transfer``: MEL with experience.transfer_replays = 2 (an acceptance rule beyond the paper);
- ``mel-overlap``: MEL with orchestration.overlap = 1 (step t's analyses in step t+1's rollout batch, the NLL
  target one step stale): does the cheaper schedule learn the same?
- ``mel-distill``: the MEL pipeline, but the NLL trains on each accepted M's first verified replay given the plain
  solve prompt, without M (context distillation: the positive control, a channel by which a lesson that helps in
  context is known to reach the context-free solver);
- ``grpo+gold``: GRPO plus NLL on the embedded world's correct solutions of the step's problems the policy solved
  least often (not every rollout right), as many per step as the ``mel`` arm of its seed accepted — a gold-SFT
  control that uses world knowledge: an NLL target that carries the decisions the policy lacks, so the harness can
  show a positive when there is one. It runs no pair, analysis or replay;
- ``mel-heuristics``: MEL with loss on the If/Then rules of M* only (experience.nll_parts = heuristics);
- ``mel-unquoted``: MEL with no loss on the critique's verbatim copies of a solution line
  (experience.mask_quoted_solution).

Every arm starts from the same checkpoint, and a step's problems and sampling seed derive from (run.seed, step)
only, so at each seed all arms train on the same problems in the same order (:func:`identical_problems`).

Statistics. Endpoints are fixed before any run: for every arm other than grpo and every held-out dataset, the
greedy Pass@1 difference (arm - GRPO) **at equal steps** (the final checkpoint) and **at equal wall time** (each
arm read at GRPO's total training seconds, seed by seed, interpolated per problem between the two evaluations
around that time: :func:`_equal_time_readout`; reports before 2026-12-07 read the last evaluation within it). The first
of eval.datasets is the **primary** dataset: its endpoints (arms x 2 read-outs) form the family that is
Holm-corrected; the others (e.g. the rules world's per-rule subsets) are secondary, reported with their CIs and
uncorrected p-values. Each difference has a paired, crossed bootstrap CI (:func:`paired_bootstrap`: per-(seed,
problem) differences, seeds and problems resampled independently) and a bootstrap p-value (twice the smaller
tail of the resampled means around 0); each CI is also given at the Bonferroni level 1 - alpha/m of the primary
family (m endpoints), which covers the family simultaneously. The crossed bootstrap is conservative when seed and
problem effects are small (on simulated binary outcomes, 3 seeds x 100-400 problems, a nominal 95% interval
covered the true difference 98-100% of the time); with S = 3 its seed part is coarse: an honest, rough bound.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mel_core import config as config_mod
from mel_core.config import ConfigError, MelConfig
from mel_core.problems import worlds
from mel_core.store import run_reads
from mel_core.store.reader import StoreReader
from mel_core.study.metrics import newcombe_difference, wilson
from mel_core.study.summary import step_summary
from mel_core.vocabulary import STAGES

BASELINE = "grpo"
# arm -> the config keys it changes (everything else is the shared config)
ARM_OVERRIDES: dict[str, dict[str, object]] = {
    "grpo": {"experience.enabled": False, "loss.nll_coef": 0.0},
    "mel": {"experience.enabled": True},
    "mel-oracle": {"experience.enabled": True, "experience.analyst": "oracle"},
    "mel-mismatched": {"experience.enabled": True, "experience.analyst": "mismatched"},
    "mel-mismatched-weak": {"experience.enabled": True, "experience.analyst": "mismatched",
                            "experience.mismatch_pool": "weak_rules"},
    "grpo+sft": {"experience.enabled": True, "experience.nll_target": "correct_rollout"},
    "mel-nofilter": {"experience.enabled": True, "experience.filter": "none"},
    "mel-transfer": {"experience.enabled": True, "experience.transfer_replays": 2},
    "mel-overlap": {"experience.enabled": True, "orchestration.overlap": 1},
    "mel-distill": {"experience.enabled": True, "experience.nll_target": "accepted_replay"},
    "grpo+gold": {"experience.enabled": True, "experience.nll_target": "reference_solution"},
    "mel-heuristics": {"experience.enabled": True, "experience.nll_parts": "heuristics"},
    "mel-unquoted": {"experience.enabled": True, "experience.mask_quoted_solution": True},
}
# arm -> the arm of the same seed whose per-step accepted counts it matches (run before it: :func:`count_matched`)
COUNT_MATCHED = {"grpo+sft": "mel", "grpo+gold": "mel"}
ARMS = tuple(ARM_OVERRIDES)
DEFAULT_ARMS = ("grpo", "mel")
BOOTSTRAP_RESAMPLES = 10_000
CI_LEVEL = 0.95
RESAMPLING = ("paired crossed bootstrap: seeds and problems resampled independently with replacement; "
              "statistic = mean of (arm - GRPO) greedy reward over the drawn seeds x problems")


# ------------------------------------------------------------------------------------------ arms


@dataclass(frozen=True)
class Arm:
    arm: str
    seed: int
    config: MelConfig


def parse_arms(text: str | None) -> tuple[str, ...]:
    """`--arms a,b,c` -> the arms in order, grpo first (the baseline every difference is taken against)."""
    arms = [a.strip() for a in (text or ",".join(DEFAULT_ARMS)).split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARM_OVERRIDES]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {', '.join(unknown)}; one of {', '.join(ARMS)}")
    return (BASELINE, *[a for a in dict.fromkeys(arms) if a != BASELINE])


def arm_config(cfg: MelConfig, name: str, arm: str, seed: int) -> MelConfig:
    """The campaign config of one arm at one seed: run `<name>-<arm>-s<seed>`, its overrides, the rest shared."""
    d = config_mod.to_dict(cfg)
    d["run"].update(name=f"{name}-{arm.replace('+', '-')}-s{seed}", seed=seed)
    for key, value in ARM_OVERRIDES[arm].items():
        section, leaf = key.split(".")
        d[section][leaf] = value
    d["eval"]["every_n_steps"] = eval_every(cfg)
    return config_mod.from_dict(d)


def eval_every(cfg: MelConfig) -> int:
    """The arms' evaluation interval: eval.every_n_steps, or (if 0) only the base and the last step."""
    return cfg.eval.every_n_steps if cfg.eval.every_n_steps > 0 else max(cfg.run.steps, 1)


def plan(cfg: MelConfig, name: str, seeds: int, arms: tuple[str, ...] = DEFAULT_ARMS) -> list[Arm]:
    """Every (arm, seed) campaign, seed by seed; the order of the arms rotates with the seed, so no arm always
    pays a process's first-generation warm-up in its timings."""
    if seeds < 1:
        raise ConfigError("compare: --seeds must be >= 1")
    if not cfg.eval.datasets:
        raise ConfigError("config key 'eval.datasets': compare needs a held-out dataset (e.g. [synthetic])")
    if not cfg.eval.greedy:
        raise ConfigError("config key 'eval.greedy': compare reports greedy Pass@1; it must be true")
    if cfg.loss.nll_coef <= 0 and any(a != BASELINE for a in arms):
        raise ConfigError("config key 'loss.nll_coef': the MEL arms need lambda > 0")
    arms = parse_arms(",".join(arms))
    for arm, source in COUNT_MATCHED.items():
        if arm in arms and source not in arms:
            raise ConfigError(f"--arms: {arm} is count-matched to the {source} arm of each seed: add {source}")
    out = []
    for i in range(seeds):
        seed = cfg.run.seed + i
        order = _sources_first(arms[i % len(arms):] + arms[:i % len(arms)])
        out += [Arm(arm, seed, arm_config(cfg, name, arm, seed)) for arm in order]
    return out


def _sources_first(order: tuple[str, ...]) -> tuple[str, ...]:
    """`order` with each count-matched arm moved to just after the arm it matches, when it came before it."""
    out = list(order)
    for arm, source in COUNT_MATCHED.items():
        if arm in out and source in out and out.index(arm) < out.index(source):
            out.remove(arm)
            out.insert(out.index(source) + 1, arm)
    return tuple(out)


def count_matched(arm: Arm, finished: dict[tuple[str, int], ArmRun]) -> MelConfig:
    """The config `arm` runs with, once the arms before it at its seed have: a count-matched arm (COUNT_MATCHED)
    names the finished run it matches (experience.count_match_run_id and count_match_store); any other is as
    planned."""
    source = COUNT_MATCHED.get(arm.arm)
    if source is None:
        return arm.config
    matched = finished.get((source, arm.seed))
    if matched is None:
        raise ConfigError(f"compare: {arm.arm} at seed {arm.seed} needs the {source} arm of that seed to run first")
    d = config_mod.to_dict(arm.config)
    d["experience"].update(count_match_run_id=matched.run_id, count_match_store=str(matched.db))
    return config_mod.from_dict(d)


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
    # two-sided bootstrap p-value of "no difference": twice the smaller share of resampled means beyond 0
    p = min(1.0, 2 * min(float(np.mean(stats <= 0)), float(np.mean(stats >= 0))))
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level, "p": p,
            "n_seeds": S, "n_problems": P, "n_resamples": n_resamples, "resampling": RESAMPLING}


def p_text(p: float, n_resamples: int) -> str:
    """A bootstrap p-value as printed: one with no resample on the other side of 0 is only bounded by the resample
    count (< 2/n), never "0"."""
    if p == 0:
        return f"< {2 / n_resamples:.0e}"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


# -------------------------------------------------------------------------------- reading the runs


def greedy_rewards(store: StoreReader, run_id: str) -> dict[tuple[str, int], dict[str, float]]:
    """(dataset, step) -> {problem_id: greedy reward} of every evaluation of the run."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for r in run_reads.greedy_eval_rewards(store, run_id):
        out.setdefault((r["dataset"], r["step"]), {})[r["problem_id"]] = r["reward"]
    return out


def _run_records(run: ArmRun) -> dict:
    """Per-step metrics and seconds, held-out metrics and greedy rewards per problem at every evaluation."""
    with StoreReader(run.db) as store:
        per_step = []
        for step in run_reads.metric_steps(store, run.run_id):
            s = step_summary(store, run.run_id, step)
            secs = s.pop("stage_seconds")
            per_step.append({**s, "seconds": sum(secs.get(st, 0.0) for st in STAGES),
                             "stage_seconds": {st: secs[st] for st in STAGES if st in secs}})
        heldout = run_reads.heldout_accuracy(store, run.run_id)
        greedy = greedy_rewards(store, run.run_id)
        prompts = run_reads.step_problems(store, run.run_id)
        lessons = run_reads.replayed_lessons(store, run.run_id) if run.arm != BASELINE else []
    return {"steps": per_step, "heldout": heldout, "greedy": greedy, "lessons": lessons,
            "prompts": [(p["step"], p["position"], p["problem_id"]) for p in prompts]}


def identical_problems(records: dict[tuple[str, int], dict], seeds: list[int], arms: tuple[str, ...]) -> bool:
    """At every seed, every arm trained on the same problems at the same steps and positions."""
    return all(records[(a, s)]["prompts"] == records[(BASELINE, s)]["prompts"] for a in arms for s in seeds)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _curves(records: dict, arm: str, seeds: list[int]) -> list[dict]:
    """Per step, the mean over seeds of reward, mixed-group fraction, acceptance, NLL per part and seconds."""
    by_step: dict[int, list[dict]] = {}
    for s in seeds:
        for row in records[(arm, s)]["steps"]:
            by_step.setdefault(row["step"], []).append(row)
    keys = ("reward_mean", "mixed_groups", "accepted", "retention_ratio", "nll_loss", "nll_bifurcation",
            "nll_critique", "nll_heuristics", "candidates", "replay_passed")
    out = []
    for step, rows in sorted(by_step.items()):
        mixed_frac = [r["mixed_groups"] / r["groups"] for r in rows if r.get("groups")]
        out.append({"step": step, "seeds": len(rows), "mixed_fraction": _mean(mixed_frac),
                    "seconds": _mean(r["seconds"] for r in rows), **{k: _mean(r.get(k) for r in rows) for k in keys}})
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


def _elapsed(records: dict, arm: str, seed: int) -> dict[int, float]:
    """step -> cumulative training seconds (sample..update) up to and including that step (0 at the base)."""
    out, total = {0: 0.0}, 0.0
    for row in sorted(records[(arm, seed)]["steps"], key=lambda r: r["step"]):
        total += row["seconds"]
        out[row["step"]] = total
    return out


def _equal_time_readout(records: dict, arm: str, seed: int, dataset: str) -> tuple[dict[str, float], float]:
    """The arm's greedy reward per problem at GRPO's whole training time (cumulative sample..update seconds, seed by
    seed), interpolated linearly in training seconds between the two evaluations around that time; and the step
    where it is read (fractional between them). An arm whose last evaluation is within the budget is read there;
    one whose first evaluation after the base is already past it, between the base and that one. Interpolating
    per problem makes each cell a number in [0, 1], whose mean is the interpolated Pass@1."""
    budget = max(_elapsed(records, BASELINE, seed).values())
    elapsed = _elapsed(records, arm, seed)
    greedy = records[(arm, seed)]["greedy"]
    evaluated = sorted(step for (ds, step) in greedy if ds == dataset)
    times = [elapsed.get(step, float("inf")) for step in evaluated]
    within = [i for i, t in enumerate(times) if t <= budget + 1e-9]
    i = within[-1] if within else 0
    if i == len(evaluated) - 1 or times[i + 1] == float("inf"):
        return greedy[(dataset, evaluated[i])], float(evaluated[i])
    w = (budget - times[i]) / (times[i + 1] - times[i])
    a, b = greedy[(dataset, evaluated[i])], greedy[(dataset, evaluated[i + 1])]
    return {p: (1 - w) * a[p] + w * b[p] for p in a}, evaluated[i] + w * (evaluated[i + 1] - evaluated[i])


def _difference(records: dict, seeds: list[int], arm: str, dataset: str, readout: str, n_resamples: int) -> dict:
    """arm - GRPO greedy Pass@1 on `dataset` at equal steps (both final) or equal wall time, per (seed, problem)."""
    cells = {}
    for s in seeds:
        g_final = max(step for (ds, step) in records[(BASELINE, s)]["greedy"] if ds == dataset)
        if readout == "equal_steps":
            a_step = max(step for (ds, step) in records[(arm, s)]["greedy"] if ds == dataset)
            a_values = records[(arm, s)]["greedy"][(dataset, a_step)]
        else:
            a_values, a_step = _equal_time_readout(records, arm, s, dataset)
            a_step = round(a_step, 1)
        cells[s] = (a_values, records[(BASELINE, s)]["greedy"][(dataset, g_final)], a_step)
    problem_sets = {frozenset(a) for a, _, _ in cells.values()} | {frozenset(g) for _, g, _ in cells.values()}
    if len(problem_sets) != 1 or not next(iter(problem_sets)):
        raise ValueError(f"{dataset}: the arms' evaluations do not cover the same problems")
    problems = sorted(next(iter(problem_sets)))
    a = np.array([[cells[s][0][p] for p in problems] for s in seeds])  # [S, P]
    g = np.array([[cells[s][1][p] for p in problems] for s in seeds])  # [S, P]
    boot = paired_bootstrap(a - g, n_resamples)
    return {"arm": arm, "dataset": dataset, "readout": readout, "steps": [cells[s][2] for s in seeds],
            "arm_pass_at_1": float(a.mean()), "grpo_pass_at_1": float(g.mean()),
            "arm_per_seed": a.mean(axis=1).tolist(), "grpo_per_seed": g.mean(axis=1).tolist(),
            "difference": boot["mean"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "p": boot["p"],
            "bootstrap": boot, "diff_matrix": (a - g).tolist()}


def filter_selectivity(records: dict, arm: str, seeds: list[int], world) -> dict | None:
    """How the replay filter treats right and wrong lessons, pooled over seeds: acceptance when the analysis
    names the rule its incorrect rollout broke (World.classify_error) minus when it names another (or none), with
    Newcombe's interval. None for a world that cannot classify errors (no way to tell a right lesson)."""
    if world is None:
        return None
    judged = {True: [0, 0], False: [0, 0]}  # lesson right? -> [accepted, reached the replay]
    for s in seeds:
        for row in records[(arm, s)]["lessons"]:
            true_rule = world.classify_error(row["question"], row["incorrect"].splitlines())
            right = true_rule is not None and true_rule in worlds.named_rules(world, list(row["heuristics"]))
            judged[right][0] += bool(row["accepted"])
            judged[right][1] += 1
    right, wrong = wilson(*judged[True]), wilson(*judged[False])
    return {"right_lessons": right, "wrong_lessons": wrong, "selectivity": newcombe_difference(right, wrong)}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _wall_time(records: dict, arm: str, seeds: list[int]) -> dict:
    rows = [r for s in seeds for r in records[(arm, s)]["steps"]]
    per_stage = {st: _mean(r["stage_seconds"].get(st) for r in rows) for st in STAGES}
    return {"seconds_per_step": _mean(r["seconds"] for r in rows), "steps_timed": len(rows),
            "stage_seconds_per_step": {k: v for k, v in per_stage.items() if v is not None}}


def build_report(runs: list[ArmRun], *, name: str, command: str, config: MelConfig, datasets: list[str],
                 n_resamples: int = BOOTSTRAP_RESAMPLES, alpha: float = 1 - CI_LEVEL) -> dict:
    """Every number of the A/B, read back from the arms' stores (the JSON that `mel compare` writes)."""
    records = {(r.arm, r.seed): _run_records(r) for r in runs}
    seeds = sorted({r.seed for r in runs})
    arms = tuple(dict.fromkeys(r.arm for r in sorted(runs, key=lambda r: ARMS.index(r.arm))))
    missing = [(a, s) for a in arms for s in seeds if (a, s) not in records]
    if missing or BASELINE not in arms:
        raise ValueError(f"compare: runs missing (every arm at every seed, and grpo): {missing}")
    endpoints = [{**_difference(records, seeds, arm, ds, readout, n_resamples), "primary": ds == datasets[0]}
                 for arm in arms if arm != BASELINE for ds in datasets for readout in ("equal_steps", "equal_time")]
    primary = [e for e in endpoints if e["primary"]]
    for e, p_holm in zip(primary, holm([e["p"] for e in primary])):
        e["p_holm"] = p_holm
        e["significant"] = p_holm < alpha
    m = max(1, len(primary))
    for e in endpoints:  # secondary endpoints keep their simultaneous CI at the primary family's level too
        bonf = paired_bootstrap(np.array(e.pop("diff_matrix")), n_resamples, 1 - alpha / m)
        e["ci_low_simultaneous"], e["ci_high_simultaneous"] = bonf["ci_low"], bonf["ci_high"]
        e.setdefault("p_holm", None)
        e.setdefault("significant", None)
    wall = {arm: _wall_time(records, arm, seeds) for arm in arms}
    g = wall[BASELINE]["seconds_per_step"]
    world = (worlds.get(config.data.synthetic.world) if config.data.source == "synthetic" else None)
    return {
        "name": name, "command": command, "arms": list(arms), "seeds": seeds, "steps": config.run.steps,
        "prompts_per_step": config.sampling.prompts_per_step, "group_size": config.sampling.group_size,
        "eval": {"datasets": datasets, "every_n_steps": eval_every(config), "k": config.eval.k,
                 "temperature": config.eval.temperature, "max_problems": config.eval.max_problems},
        "identical_problems": identical_problems(records, seeds, arms),
        "runs": [{"arm": r.arm, "seed": r.seed, "run_name": r.run_name, "run_id": r.run_id, "db": r.db,
                  "final_checkpoint_id": r.final_checkpoint_id} for r in runs],
        "curves": {arm: _curves(records, arm, seeds) for arm in arms},
        "heldout": {ds: {arm: _heldout_curve(records, arm, seeds, ds) for arm in arms} for ds in datasets},
        "endpoints": endpoints, "alpha": alpha, "correction": "holm",
        "filter": {arm: filter_selectivity(records, arm, seeds, world) for arm in arms if arm != BASELINE},
        "wall_time": {**wall, "over_grpo": {a: (wall[a]["seconds_per_step"] / g) if g and wall[a]["seconds_per_step"]
                                            else None for a in arms}},
    }


# ---------------------------------------------------------------------------------------- report


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _rate(w: dict) -> str:
    return "-" if not w["n"] else f"{w['rate']:.3f} ({w['successes']}/{w['n']})"


def write_plots(report: dict, out_dir: str | Path, stem: str) -> dict[str, str]:
    """PNG curves of the A/B beside its markdown: training reward, held-out greedy Pass@1 per dataset, and
    acceptance and NLL per part of M of the MEL arms. Returns {what: file name} for the plots drawn."""
    from mel_core.study.report import line_plot

    out_dir = Path(out_dir)
    curves, plots = report["curves"], {}
    mel_arms = [a for a in report["arms"] if a != BASELINE]

    def series(rows, key):
        return [(r["step"], r[key]) for r in rows if r.get(key) is not None]

    def draw(what, title, ylabel, lines, ylim=None):
        path = out_dir / f"{stem}-{what.replace(':', '-')}.png"  # "synthetic:skip": no ':' in a link or on Windows
        if line_plot(path, title, ylabel, lines, ylim):
            plots[what] = path.name

    draw("reward", "Training reward at T=1 (mean over seeds)", "reward",
         {arm: series(curves[arm], "reward_mean") for arm in report["arms"]}, (0, 1))
    for ds, arms in report["heldout"].items():
        draw(f"heldout-{ds}", f"Held-out greedy Pass@1: {ds} (mean over seeds)", "Pass@1",
             {arm: series(arms[arm], "pass_at_1") for arm in report["arms"]}, (0, 1))
    draw("acceptance", "Accepted meta-experiences per step (mean over seeds)", "accepted",
         {arm: series(curves[arm], "accepted") for arm in mel_arms})
    draw("nll-parts", "NLL per part of M, MEL arms (mean over seeds)", "nats per token",
         {f"{arm} {part}": series(curves[arm], f"nll_{part}") for arm in mel_arms
          for part in ("bifurcation", "critique", "heuristics")})
    return plots


def format_markdown(report: dict) -> str:
    r = report
    lines = [f"# A/B: {', '.join(r['arms'])} — {r['name']}", "", "Command:", "", "```", r["command"], "```", "",
             (f"{len(r['seeds'])} seed(s) {r['seeds']} x {len(r['arms'])} arms; {r['steps']} steps of "
             f"B={r['prompts_per_step']} prompts x G={r['group_size']}; every arm starts from the same checkpoint. "
             f"Identical problems per step in every arm at every seed: **{'yes' if r['identical_problems'] else 'NO'}**."),
             (f"Held-out: {', '.join(r['eval']['datasets'])} (greedy Pass@1; "
             + (f"Avg@{r['eval']['k']} / Pass@{r['eval']['k']} at T={r['eval']['temperature']}; "
                if r["eval"]["k"] else "no sampled metrics, eval.k = 0; ")
             + f"{r['eval']['max_problems'] or 'all'} problems per dataset)."), "",
             (f"## Differences to GRPO (endpoints fixed in advance; Holm across the "
             f"{sum(e['primary'] for e in r['endpoints'])} on {r['eval']['datasets'][0]})"), "",
             ("| arm | dataset | read-out | arm Pass@1 | GRPO Pass@1 | difference | 95% CI | simultaneous CI | "
             "p | p (Holm) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["endpoints"]:
        lines.append(f"| {e['arm']} | {e['dataset']} | {e['readout'].replace('_', ' ')} (steps {e['steps']}) | "
                     f"{_f(e['arm_pass_at_1'])} | {_f(e['grpo_pass_at_1'])} | **{e['difference']:+.3f}** | "
                     f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] | "
                     f"[{e['ci_low_simultaneous']:+.3f}, {e['ci_high_simultaneous']:+.3f}] | "
                     f"{p_text(e['p'], e['bootstrap']['n_resamples'])} | "
                     + (f"{p_text(e['p_holm'], e['bootstrap']['n_resamples'])}{' *' if e['significant'] else ''}"
                        if e["primary"] else "secondary") + " |")
    if r["endpoints"]:
        b = r["endpoints"][0]["bootstrap"]
        lines += ["", (f"{b['n_seeds']} seeds x {b['n_problems']} problems, {b['n_resamples']} resamples; "
                  f"{b['resampling']}. * = significant at alpha = {r['alpha']:.2f} after Holm. The simultaneous CI "
                  f"is at level 1 - alpha/{len(r['endpoints'])} (Bonferroni)."), ""]
    if r.get("plots"):
        lines += ["## Plots", ""] + [f"![{what}]({name})" for what, name in r["plots"].items()] + [""]
    if any(r.get("filter", {}).values()):
        lines += ["## The replay filter: acceptance of right and wrong lessons (pooled over seeds)", "",
                  ("A lesson is right when the analysis names the rule its incorrect rollout broke (the world's "
                  "classification)."), "",
                  "| arm | accepted, right lessons | accepted, wrong lessons | selectivity (right - wrong) |",
                  "|---|---|---|---|"]
        for arm, f in r["filter"].items():
            if f:
                sel = f["selectivity"]
                lines.append(f"| {arm} | {_rate(f['right_lessons'])} | {_rate(f['wrong_lessons'])} | "
                             + (f"{sel['difference']:+.3f} [{sel['ci_low']:+.3f}, {sel['ci_high']:+.3f}]"
                                if sel["difference"] is not None else "-") + " |")
        lines.append("")
    lines += ["## Per-step training curves (mean over seeds)", "",
              "| step | " + " | ".join(f"{a} reward" for a in r["arms"]) + " | "
              + " | ".join(f"{a} accepted" for a in r["arms"] if a != BASELINE) + " |",
              "|---|" + "---|" * (2 * len(r["arms"]) - 1)]
    by_arm = {a: {c["step"]: c for c in r["curves"][a]} for a in r["arms"]}
    for step in sorted(by_arm[BASELINE]):
        lines.append(f"| {step} | " + " | ".join(_f(by_arm[a].get(step, {}).get("reward_mean")) for a in r["arms"])
                     + " | " + " | ".join(_f(by_arm[a].get(step, {}).get("accepted"), "{:.1f}")
                                          for a in r["arms"] if a != BASELINE) + " |")
    nll_parts = ("bifurcation", "critique", "heuristics")
    nll_arms = [a for a in r["arms"] if any(c.get("nll_loss") is not None for c in r["curves"][a])]
    if nll_arms:
        lines += ["", "## NLL per part of M (nats per token, mean over seeds and the steps that had an NLL term)", "",
                  "| arm | NLL (trained target) | " + " | ".join(nll_parts) + " |", "|---|---|" + "---|" * len(nll_parts)]
        for a in nll_arms:
            lines.append(f"| {a} | {_f(_mean(c.get('nll_loss') for c in r['curves'][a]))} | "
                         + " | ".join(_f(_mean(c.get(f"nll_{p}") for c in r["curves"][a])) for p in nll_parts) + " |")
    for ds, arms in r["heldout"].items():
        lines += ["", f"## Held-out greedy Pass@1 at evaluation points: {ds} (mean over seeds)", "",
                  "| step | " + " | ".join(r["arms"]) + " |", "|---|" + "---|" * len(r["arms"])]
        by = {a: {h["step"]: h for h in arms[a]} for a in r["arms"]}
        for step in sorted(by[BASELINE]):
            lines.append(f"| {step} | " + " | ".join(_f(by[a].get(step, {}).get("pass_at_1")) for a in r["arms"]) + " |")
    w = r["wall_time"]
    lines += ["", "## Wall time per training step (sample..update, mean over seeds and steps; evaluation excluded)", "",
              "| arm | s/step | x GRPO | " + " | ".join(STAGES) + " |", "|---|---|---|" + "---|" * len(STAGES)]
    for arm in r["arms"]:
        st = w[arm]["stage_seconds_per_step"]
        lines.append(f"| {arm} | {_f(w[arm]['seconds_per_step'], '{:.2f}')} | {_f(w['over_grpo'][arm], '{:.2f}')} | "
                     + " | ".join(_f(st.get(s), '{:.2f}') for s in STAGES) + " |")
    lines += ["", "## Runs", "", "| arm | seed | run | DuckDB |", "|---|---|---|---|"]
    lines += [f"| {x['arm']} | {x['seed']} | {x['run_name']} ({x['run_id']}) | {x['db']} |" for x in r["runs"]]
    return "\n".join(lines) + "\n"


def command_line(argv: list[str]) -> str:
    """The exact `mel compare` invocation, shell-quoted, for the report."""
    return shlex.join(["mel", *argv])
