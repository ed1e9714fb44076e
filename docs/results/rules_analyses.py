"""The rules world's MEL runs: what the policy's wrong rollouts broke, and whether its own analyses name it
(docs/results/world.md).

For every analysed pair: the true error of the incorrect rollout (mel_core.problems.worlds.rules.classify_error: the rule
that applies where it first parts from the correct solution, or none for a slip), whether the analysis states
that rule's lesson and names its bifurcation step, and how often an analysis was accepted by the replay, split
by whether it named the true rule.

    .venv/bin/python docs/results/rules_analyses.py runs/tiny-rules [more run directories]
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's mel_core, not an installed one
from mel_core.problems.worlds import rules
from mel_core.store.reader import StoreReader


def _question(prompt: str) -> str:
    return re.search(r"^Q: (.*)$", prompt, re.MULTILINE).group(1).strip()


def _stated_rule(text: str | None) -> str | None:
    """The rule whose lesson the analysis's first Heuristic line states, or None."""
    m = re.search(r"^Heuristic: (.*)$", text or "", re.MULTILINE)
    return next((t for t, lesson in rules.ERROR_TYPES.items() if m and m.group(1).strip() == lesson), None)


def main(run_dirs: list[str]) -> None:
    true_types = collections.Counter()
    named = collections.Counter()
    step_right = collections.Counter()
    accepted = collections.Counter()  # (names the true rule?, accepted?) -> count
    for d in run_dirs:
        store = StoreReader(f"{d}/mel.duckdb")
        rows = store.query(
            "SELECT a.prompt_text, a.raw_text, a.bifurcation_step, a.status, i.text AS incorrect "
            "FROM analyses a JOIN pairs p USING (pair_id) JOIN rollouts i ON i.rollout_id = p.incorrect_rollout_id")
        for r in rows:
            question = _question(r["prompt_text"])
            wrong = [line for line in r["incorrect"].splitlines() if line.strip()]
            true = rules.classify_error(question, wrong) or "none (slip or malformed)"
            true_types[true] += 1
            hit = _stated_rule(r["raw_text"]) == true
            named[true] += hit
            if true in rules.ERROR_TYPES:
                right = rules.solution_lines(question)
                k = next(i for i, (w, c) in enumerate(zip(wrong, right), start=1) if w.strip() != c.strip())
                step_right[true] += r["bifurcation_step"] == k
            accepted[(hit, r["status"] == "accepted")] += 1
    n = sum(true_types.values())
    print(f"{n} analysed pairs in {len(run_dirs)} run(s)\n")
    print("| true error of the incorrect rollout | pairs | share | analysis states its lesson | names its step |")
    print("|---|---|---|---|---|")
    for kind, count in true_types.most_common():
        steps = f"{step_right[kind] / count:.2f}" if kind in rules.ERROR_TYPES else "-"
        print(f"| {kind} | {count} | {count / n:.2f} | {named[kind] / count:.2f} | {steps} |")
    for hit in (True, False):
        total = accepted[(hit, True)] + accepted[(hit, False)]
        if total:
            print(f"\nanalyses {'naming' if hit else 'not naming'} the true rule: {total}, accepted by the replay "
                  f"{accepted[(hit, True)] / total:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
