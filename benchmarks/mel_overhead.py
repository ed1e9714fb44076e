"""MEL's cost over plain GRPO: one MEL step ÷ one GRPO-only step on the same batch, with the stages in sequence
and with orchestration.overlap: 1 (the previous step's analyses generated in this step's rollout batch).

Both arms start every measured step from the same policy version (the cached tiny warm start), with the
same run seed, so they sample the same prompts and the same rollouts; GRPO then updates on them, MEL
first pairs, diagnoses, abstracts and replays. The stage functions are called directly (no Prefect:
benchmarks/orchestration.py measures that), so the ratio is the model work plus the store bookkeeping.

    .venv/bin/python benchmarks/mel_overhead.py [--prompts 16 128 --steps 3]

The overlap arm's measured step t is sample(t) with step t-1's analyses in its batch, verify, pair, abstract(t-1),
replay(t-1), update(t): the stages one step of a campaign with overlap runs.

The issue's goal is a ratio <= 1.25; it needs the analysis and replay generations batched (one engine
call per stage), which they are.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._doc import write_section  # noqa: E402
from mel_core import config as C
from mel_core.run import executions
from mel_core.step import stages
from mel_core.step.runtime import Runtime
from mel_core.vocabulary import STAGES

GRPO_STAGES = ("sample", "verify", "update")


ARMS = ("grpo", "mel", "mel-overlap")


def make_runtime(root: Path, prompts: int, arm: str) -> Runtime:
    overrides = [f"run.name=overhead-{arm}-{prompts}", f"run.root_dir={root}", f"sampling.prompts_per_step={prompts}"]
    if arm == "grpo":
        overrides += ["experience.enabled=false", "loss.nll_coef=0"]
    if arm == "mel-overlap":
        overrides += ["orchestration.overlap=1"]
    rt = Runtime(C.load("configs/tiny.yaml", overrides))
    executions.register_run(rt, rt.base_checkpoint)
    return rt


def timed_step(rt: Runtime, step: int) -> dict[str, float]:
    """Seconds per stage of one step from the base policy (reloaded outside the timing)."""
    base = rt.base_checkpoint
    rt.ensure_version(base)
    names = STAGES if rt.cfg.experience.enabled else GRPO_STAGES
    analysed = stages.experience_step(rt, step)  # overlap: the step before, whose analyses `sample` generates
    if analysed != step:
        names = tuple(n for n in names if n != "diagnose")
    calls = {"sample": lambda: stages.sample(rt, step, base), "verify": lambda: stages.verify(rt, step),
             "pair": lambda: stages.pair(rt, step), "diagnose": lambda: stages.diagnose(rt, step, base),
             "abstract": lambda: stages.abstract(rt, analysed, base),
             "replay": lambda: stages.replay(rt, analysed, base), "update": lambda: stages.update(rt, step, base)}
    seconds = {}
    for name in names:
        t0 = time.perf_counter()
        calls[name]()
        seconds[name] = time.perf_counter() - t0
    return seconds


def measure(root: Path, prompts: int, steps: int, log) -> dict:
    runtimes = {arm: make_runtime(root, prompts, arm) for arm in ARMS}
    grpo, mel = runtimes["grpo"], runtimes["mel"]
    for rt in runtimes.values():
        timed_step(rt, 0)  # warm-up: first generate/backward in a process are several times slower
    per_arm: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for step in range(1, steps + 1):  # interleaved, so load from other processes hits every arm alike
        for arm, rt in runtimes.items():
            per_arm[arm].append(timed_step(rt, step))
        log(f"  B={prompts} step {step}: " + ", ".join(f"{arm} {sum(per_arm[arm][-1].values()):.2f}s" for arm in ARMS))
    texts = "SELECT list(r.text ORDER BY p.position, r.sample_index) AS t FROM rollouts r JOIN prompts p USING (prompt_id) " \
            "WHERE r.step = 1"  # ids differ between the arms (their run ids do), positions do not
    same = grpo.store.query(texts)[0]["t"] == mel.store.query(texts)[0]["t"]
    med = {arm: {s: statistics.median(r[s] for r in runs) for s in runs[0]} for arm, runs in per_arm.items()}
    totals = {arm: statistics.median(sum(r.values()) for r in runs) for arm, runs in per_arm.items()}
    counts = mel.store.query("SELECT avg(CASE WHEN name = 'analyses' THEN value END) AS analyses, "
                             "avg(CASE WHEN name = 'accepted' THEN value END) AS accepted FROM metrics WHERE step > 0")[0]
    return {"prompts": prompts, "group_size": mel.cfg.sampling.group_size, "stage_seconds": med, "totals": totals,
            "ratio": totals["mel"] / totals["grpo"], "overlap_ratio": totals["mel-overlap"] / totals["grpo"],
            "same_rollouts": same, **counts}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 128],
                    help="prompts per step (B); 16 is the demo, 128 the paper's batch")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per arm (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    a.load_at_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    torch.set_num_threads(a.threads)
    log = lambda m: print(m, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="mel-overhead-") as d:
        for b in a.prompts:
            results.append(measure(Path(d), b, a.steps, log))
    lines = []
    for r in results:
        g, m, o = (r["stage_seconds"][arm] for arm in ARMS)
        lines += [f"B={r['prompts']} G={r['group_size']} (same rollouts in GRPO and MEL: {r['same_rollouts']}; "
                  f"{r['analyses']:.1f} analyses and {r['accepted']:.1f} accepted per step on average in MEL)", "",
                  "| stage | GRPO s | MEL s | MEL, overlap 1 s |", "|---|---|---|---|"]
        lines += [f"| {s} | {g.get(s, 0):.2f} | {m.get(s, 0):.2f} | {o.get(s, 0):.2f} |" for s in STAGES]
        lines += [f"| **step** | **{r['totals']['grpo']:.2f}** | **{r['totals']['mel']:.2f}** | "
                  f"**{r['totals']['mel-overlap']:.2f}** |", "",
                  f"- **MEL step ÷ GRPO step: {r['ratio']:.2f}** (goal ≤ 1.25); with overlap: "
                  f"**{r['overlap_ratio']:.2f}** (sample includes the previous step's analyses)", ""]
        print(f"B={r['prompts']}: grpo {r['totals']['grpo']:.2f}s, mel {r['totals']['mel']:.2f}s, "
              f"mel-overlap {r['totals']['mel-overlap']:.2f}s, ratios {r['ratio']:.3f} / {r['overlap_ratio']:.3f}")
    headline = results[-1]
    if not a.no_doc:
        cmd = ".venv/bin/python benchmarks/mel_overhead.py" + "".join(" " + x for x in (argv or sys.argv[1:]))
        write_section("mel_overhead.py", cmd, [
            f"Tiny warm-started model (configs/tiny.yaml), stage functions called directly, {a.threads} threads; "
            f"median of {a.steps} steps per arm, each from the same base policy, arms interleaved step by step. The "
            f"headline is the largest B. Load average at the start: {a.load_at_start}.", "",
            "On a CPU the HF engine shares one padded batch between the rollouts and the previous step's analyses only "
            "when that costs no more padded tokens than two calls (mel_core/model/engines/hf.py `_cheaper_together`): "
            "forced to share at B=16 (2026-12-07 16:14, load 1.6), the shared sample took 1.08 s against 0.39 s + "
            "0.25 s for the two calls (every rollout row padded to an analysis prompt's length and decoded to its "
            "limit) and MEL with overlap was 2.28x GRPO against 1.68x. So on a CPU the overlap arm runs two calls and "
            "costs what MEL does; the batch sharing it exists for is vLLM's (continuous batching pads nothing) and "
            "the HF engine's on a GPU (a decoding step costs about the same for more rows), neither measurable here.",
            "",
            *lines])
    print(f"mel_overhead_ratio: {headline['ratio']:.3f}")
    return {"results": results, "mel_overhead_ratio": headline["ratio"]}


if __name__ == "__main__":
    main()
