"""The compact analysis every embedded world writes for an error: ``Bifurcation / Critique / Heuristic``.

What the tiny model's warm start teaches it to write about a (wrong, right) pair of solutions, and what
``mel_core.algorithm.meta_experience.parse_analysis`` reads back in its compact layout.
"""

from __future__ import annotations


def first_difference(incorrect_lines: list[str], correct_lines: list[str]) -> int:
    """1-based index of the first line where the two solutions part (the bifurcation step)."""
    for k, (w, r) in enumerate(zip(incorrect_lines, correct_lines), start=1):
        if w.strip() != r.strip():
            return k
    if len(incorrect_lines) == len(correct_lines):
        raise ValueError("the two solutions are identical: there is no bifurcation step")
    return min(len(incorrect_lines), len(correct_lines)) + 1


def compact_analysis(incorrect_lines: list[str], correct_lines: list[str], lesson: str) -> str:
    """``Bifurcation: step k`` / ``Critique: <wrong line> should be <right line>.`` / ``Heuristic: <lesson>``."""
    k = first_difference(incorrect_lines, correct_lines)
    wrong = incorrect_lines[k - 1].strip() if k <= len(incorrect_lines) else "(nothing)"
    right = correct_lines[k - 1].strip() if k <= len(correct_lines) else "(nothing)"
    return (f"Bifurcation: step {k}\n"
            f"Critique: {wrong} should be {right}.\n"
            f"Heuristic: {lesson}")
