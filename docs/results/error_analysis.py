"""Error analysis of an A/B's MEL arms (docs/RESULTS.md): what the policy's wrong rollouts get wrong, and
whether the analyses it wrote name that error and the predicted bifurcation step.

    .venv/bin/python docs/results/error_analysis.py runs/ab/ab-mel-s0 runs/ab/ab-mel-s1 runs/ab/ab-mel-s2
"""

from __future__ import annotations

import collections
import re
import sys

from mel_core.problems.worlds import arithmetic
from mel_core.store.reader import StoreReader


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Answer")]


def _rule(text: str) -> str:
    """The world's error type whose rule sentence the heuristic states, or 'free text'."""
    key = re.sub(r"\W", "", text.lower())
    return next((t for t, sentence in arithmetic.ERROR_TYPES.items() if re.sub(r"\W", "", sentence.lower()) == key),
                "free text")


def main(run_dirs: list[str]) -> None:
    types = collections.Counter()
    step_hit = collections.Counter()
    heuristic_type = collections.Counter()
    rule_match = collections.Counter()
    examples = []
    pairs = 0
    for d in run_dirs:
        s = StoreReader(f"{d}/mel.duckdb")
        rows = s.query(
            "SELECT a.analysis_id, a.bifurcation_step, a.status, a.reject_reason, c.text AS correct, i.text AS incorrect "
            "FROM analyses a JOIN pairs p USING (pair_id) JOIN rollouts c ON c.rollout_id = p.correct_rollout_id "
            "JOIN rollouts i ON i.rollout_id = p.incorrect_rollout_id")
        for r in rows:
            pairs += 1
            wrong, right = lines(r["incorrect"]), lines(r["correct"])
            try:
                k = arithmetic.first_difference(wrong, right)
            except ValueError:
                types["identical steps (answer line differs)"] += 1
                continue
            kind = (arithmetic.classify_error(wrong[k - 1], right[k - 1]) if k <= min(len(wrong), len(right)) else None)
            types[kind or "other (not one of the world's error types)"] += 1
            if kind is None and k <= min(len(wrong), len(right)) and len(examples) < 6:
                examples.append(f"{wrong[k - 1].strip()}  (should be {right[k - 1].strip()})")
            if kind is not None:
                rules = {_rule(h["text"]) for h in s.query("SELECT text FROM heuristics WHERE analysis_id = ?",
                                                             [r["analysis_id"]])}
                rule_match["names the true type" if kind in rules else
                           "names other types" if rules else "no heuristic"] += 1
            if r["bifurcation_step"] is not None:
                step_hit["analysis names the true bifurcation step" if r["bifurcation_step"] == k else
                         "analysis names another step"] += 1
            else:
                step_hit["no bifurcation step parsed"] += 1
        for h in s.query("SELECT text, accepted FROM heuristics"):
            rule = _rule(h["text"])
            heuristic_type[(rule, "accepted" if h["accepted"] else "rejected")] += 1
    print(f"{pairs} analysed pairs in {len(run_dirs)} runs")
    print("error type of the incorrect rollout at its first differing line:")
    for k, v in types.most_common():
        print(f"  {k}: {v} ({v / pairs:.0%})")
    print("examples of 'other':", *examples, sep="\n  ")
    print("heuristics of analyses whose pair has one of the world's error types:")
    for k, v in rule_match.most_common():
        print(f"  {k}: {v}")
    print("bifurcation step written by the policy:")
    for k, v in step_hit.most_common():
        print(f"  {k}: {v}")
    print("heuristics by the rule they state:")
    for (rule, status), v in sorted(heuristic_type.items()):
        print(f"  {rule} / {status}: {v}")


if __name__ == "__main__":
    main(sys.argv[1:])
