"""Verify throughput: MATH-500's 500 human solutions scored as model outputs through the worker pool.

Prints the pool's start-up (first verdict from a cold pool), items/s for each extraction (median of --repeats
batches of 500 on a warm pool), and the wall time of a 40-item batch in which one item is stuck past its deadline
(it costs one worker kill and restart), and writes them to docs/BENCHMARKS.md; numbers on a shared machine vary by
tens of percent.

    .venv/bin/python benchmarks/verify.py [--workers 2 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks._doc import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="MEL_VERIFY_WORKERS for this run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-doc", action="store_true", help="print only; do not rewrite docs/BENCHMARKS.md")
    args = ap.parse_args()
    os.environ["MEL_VERIFY_WORKERS"] = str(args.workers)
    from mel_core.algorithm import rewards

    rows = [json.loads(line) for line in (REPO / "data" / "math500" / "test.jsonl").open(encoding="utf-8")]
    texts, golds = [r["solution"] for r in rows], [r["answer"] for r in rows]
    rewards.shutdown_pool()
    t0 = time.perf_counter()
    rewards.verify_math_batch([r"$\boxed{1}$"] * args.workers, ["1"] * args.workers, 60)
    start = time.perf_counter() - t0
    rates = {}
    for extraction in rewards.EXTRACTIONS:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            verdicts = rewards.verify_math_batch(texts, golds, 20, extraction=extraction)
            times.append(time.perf_counter() - t0)
            assert sum(v.reward for v in verdicts) == len(rows), extraction
        rates[extraction] = len(rows) / statistics.median(times)
    n = 40
    t0 = time.perf_counter()
    verdicts = rewards.verify_math_batch([rf"$\boxed{{{i}}}$" for i in range(n)], [str(i) for i in range(n)], 1.0,
                                   _test_delay_s=[30.0 if i == 5 else 0.0 for i in range(n)])
    stuck = time.perf_counter() - t0
    assert [v.reason for v in verdicts].count("timeout") == 1 and sum(v.reward for v in verdicts) == n - 1
    rewards.shutdown_pool()
    print(f"workers {args.workers}: start {start:.2f} s; " + "; ".join(f"{k} {v:.0f} items/s" for k, v in rates.items())
          + f"; {n} items with one stuck past a 1 s deadline {stuck:.2f} s")
    print(f"verify_items_per_s: {rates[rewards.DEFAULT_EXTRACTION]:.0f}")
    if not args.no_doc:
        write_section("verify.py", f"python benchmarks/verify.py --workers {args.workers} --repeats {args.repeats}", [
            f"MATH-500's {len(rows)} reference solutions scored against their gold answers through the verify pool "
            f"({args.workers} worker processes); every one verifies correct under each extraction (asserted).", "",
            "| measurement | value |", "|---|---|",
            f"| pool start-up (first verdict, cold) | {start:.2f} s |",
            *[f"| `{k}` extraction, warm pool (median of {args.repeats} batches of {len(rows)}) | {v:.0f} items/s |"
              for k, v in rates.items()],
            f"| {n} items, one stuck past a 1 s deadline (one worker killed and restarted) | {stuck:.2f} s |"],
            f"math-verify {version('math-verify')}")


if __name__ == "__main__":
    main()
