"""First-n against last-n steps of a per-step training curve in a `mel compare` report, arm by arm.

For the knowing-without-doing check of RESULTS §6.3 (prediction 9): does an arm learn to write its lessons (the
NLL of H falls) while its solving does not move? Reads the report's JSON for its runs, and each seed's per-step
metrics from its store (read-only), so the ratio is shown seed by seed.

    .venv/bin/python experiments/curve_trend.py docs/results/lessons-e.json nll_heuristics --first 5 --last 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mel_core.store import run_reads
from mel_core.store.reader import StoreReader


def trend(rows: list[dict], key: str, first: int, last: int) -> tuple[float | None, float | None]:
    """Mean of `key` over the first `first` and the last `last` steps that logged it."""
    vals = [r[key] for r in sorted(rows, key=lambda r: r["step"]) if r.get(key) is not None]
    if not vals:
        return None, None
    return float(np.mean(vals[:first])), float(np.mean(vals[-last:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("key", help="a per-step metric, e.g. nll_heuristics, nll_loss, accepted")
    ap.add_argument("--first", type=int, default=5)
    ap.add_argument("--last", type=int, default=5)
    a = ap.parse_args()
    report = json.loads(a.report.read_text())
    for arm in report["arms"]:
        ratios = []
        for x in (x for x in report["runs"] if x["arm"] == arm):
            with StoreReader(x["db"]) as r:
                head, tail = trend(run_reads.metrics_by_step(r, x["run_id"]), a.key, a.first, a.last)
            if head is not None:
                ratios.append((x["seed"], head, tail))
        if not ratios:
            print(f"{arm:16s} {a.key}: not logged")
            continue
        cells = "  ".join(f"s{s}: {h:.4f} -> {t:.4f} ({t / h:.3f}x)" if h else f"s{s}: {h:.4f} -> {t:.4f}"
                          for s, h, t in ratios)
        print(f"{arm:16s} {a.key} first {a.first} -> last {a.last} steps  {cells}")


if __name__ == "__main__":
    main()
