"""Between-arm contrasts of a `mel compare` report: e.g. mel-oracle - mel and mel - mel-mismatched, at equal steps.

The report's JSON lists every arm's run and store; this reads each run's greedy held-out rewards per problem at
its last evaluation (read-only, as `mel query` does), pairs the two arms seed by seed and problem by problem, and
applies the report's paired crossed bootstrap (mel_core.study.ab_test.paired_bootstrap). These contrasts are secondary
(descriptive, not in the report's Holm family).

    .venv/bin/python experiments/arm_contrasts.py docs/results/rules-lambda1.json mel-oracle:mel mel:mel-mismatched
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mel_core.store.reader import StoreReader
from mel_core.study.ab_test import greedy_rewards, p_text, paired_bootstrap


def final_greedy(db: str, run_id: str, dataset: str) -> dict[str, float]:
    """problem_id -> greedy reward at the run's last evaluation of `dataset`."""
    with StoreReader(db) as r:
        by_eval = greedy_rewards(r, run_id)
    return by_eval[(dataset, max(step for ds, step in by_eval if ds == dataset))]


def contrasts(report: dict, pairs: list[tuple[str, str]], dataset: str | None = None) -> list[dict]:
    dataset = dataset or report["eval"]["datasets"][0]
    runs = {(x["arm"], x["seed"]): x for x in report["runs"]}
    rewards = {key: final_greedy(x["db"], x["run_id"], dataset) for key, x in runs.items()
               if key[0] in {arm for pair in pairs for arm in pair}}
    out = []
    for a, b in pairs:
        problems = sorted(rewards[(a, report["seeds"][0])])
        d = np.array([[rewards[(a, s)][p] - rewards[(b, s)][p] for p in problems] for s in report["seeds"]])  # [S, P]
        out.append({"contrast": f"{a} - {b}", "dataset": dataset, **paired_bootstrap(d)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("pairs", nargs="+", help="A:B, e.g. mel-oracle:mel")
    ap.add_argument("--dataset")
    a = ap.parse_args()
    report = json.loads(a.report.read_text())
    for c in contrasts(report, [tuple(p.split(":", 1)) for p in a.pairs], a.dataset):
        print(f"{c['contrast']:26s} {c['dataset']:15s} equal steps: {c['mean']:+.3f} "
              f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]  p {p_text(c['p'], c['n_resamples'])}")


if __name__ == "__main__":
    main()
