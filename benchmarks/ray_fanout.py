"""Ray fan-out speed-up: the generation of a step on one process vs on a 2-worker local Ray cluster.

Both sides run the same engine calls through the runtime (`orchestration.runner: local | ray`): the
step's rollouts (B prompts × G samples, cut into chunks of `sampling.chunk_sequences`). One process
uses all the cores with torch threads; the Ray side runs `--workers` workers with `cores / workers`
threads each, every chunk a Prefect task on prefect-ray's task runner (ephemeral Prefect server).
The first call on each side warms it up (cluster start, model load in the workers) and is reported
apart. Needs the `scale` extra (`make test-scale` installs it).

    .venv/bin/python benchmarks/ray_fanout.py [--prompts 32 --n 8 --chunk 64 --repeats 3 --workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from benchmarks._doc import load_average, write_section  # noqa: E402
from mel_core import config as C
from mel_core.model.engines.base import SamplingParams
from mel_core.step.runtime import Runtime


def measure(rt: Runtime, prompts, a) -> tuple[float, list[float]]:
    """Seconds of the first (warm-up) call, then generated tokens/s of each repeat."""
    rates, first = [], None
    for i in range(a.repeats + 1):
        params = SamplingParams(n=a.n, temperature=1.0, max_new_tokens=a.max_new_tokens, seed=i)
        t0 = time.perf_counter()
        groups = rt.engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        print(f"  {rt.cfg.orchestration.runner} round {i}: {tokens} tok in {dt:.2f}s", flush=True)
        if i == 0:
            first = dt
        else:
            rates.append(tokens / dt)
    return first, rates


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=64, help="sampling.chunk_sequences")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    from prefect.testing.utilities import prefect_test_harness

    from flows.workers import generation_workers

    results = {}
    with tempfile.TemporaryDirectory(prefix="mel-ray-") as d, prefect_test_harness():
        for runner, threads in (("local", a.cores), ("ray", max(1, a.cores // a.workers))):
            cfg = C.load("configs/tiny.yaml", [
                f"run.name=ray-bench-{runner}", f"run.root_dir={d}", f"run.torch_threads={a.cores}",
                f"sampling.prompts_per_step={a.prompts}", f"sampling.chunk_sequences={a.chunk}",
                f"orchestration.runner={runner}", f"orchestration.ray.local_workers={a.workers}",
                f"orchestration.ray.threads_per_worker={threads}"])
            rt = Runtime(cfg)
            with generation_workers(rt):  # the Ray runner a campaign flow would start (nothing for local)
                rt.ensure_version(rt.base_checkpoint)
                prompts = [rt.model_input(rt.prompts.render_solve(p.question)) for p in rt.step_problems(1)]
                results[runner] = measure(rt, prompts, a)
    local, ray = (statistics.median(results[r][1]) for r in ("local", "ray"))
    speedup = ray / local
    print(f"one process {local:,.0f} tok/s, Ray {a.workers} workers {ray:,.0f} tok/s")
    if not a.no_doc:
        cmd = ".venv/bin/python benchmarks/ray_fanout.py" + "".join(" " + x for x in (argv or sys.argv[1:]))
        write_section("ray_fanout.py", cmd, [
            f"{a.prompts} prompts × n={a.n}, ≤{a.max_new_tokens} new tokens, chunks of {a.chunk} sequences, tiny "
            f"warm-started model; one process with {a.cores} torch threads vs {a.workers} Ray workers with "
            f"{max(1, a.cores // a.workers)} each (each chunk a Prefect task); median of {a.repeats} rounds after one "
            f"warm-up; load average at the end {load_average()}.", "",
            f"- one process: {local:,.0f} generated tok/s (first call {results['local'][0]:.1f} s)",
            f"- Ray, {a.workers} workers: {ray:,.0f} generated tok/s (first call, cluster start and model loads "
            f"included: {results['ray'][0]:.1f} s)",
            f"- **speed-up: {speedup:.2f}×**", "",
            "Both sides share the same cores: workers only pay off with cores (or GPUs, hosts) the flow process "
            "cannot use itself. The completions are the same on both sides (same tokens per round)."])
    print(f"ray_speedup: {speedup:.2f}")
    return {"ray_speedup": speedup}


if __name__ == "__main__":
    main()
