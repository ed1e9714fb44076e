"""The embedded synthetic worlds a campaign can train on with no download (``data.source: synthetic``).

A world generates problems with seeded, disjoint train and held-out splits, writes their correct step-by-step
solutions (ending with ``Answer: ...``), and knows the error types a solver makes: for each, the lesson (an
If/then rule naming no problem specifics), how to inject one into a solution, and the compact analysis of such
an error — what the tiny model's warm start teaches it to write (mel_core.model.tiny). ``data.synthetic.world``
picks one by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from mel_core.vocabulary import WORLDS


@dataclass(frozen=True)
class Decision:
    """One choice a solution makes: after `prefix` (the correct solution text up to the choice), the solver writes
    one of `continuations`, each naming one of `choices` (the world's rules); `right` is the correct choice."""
    step: int
    prefix: str
    choices: tuple[str, ...]
    continuations: tuple[str, ...]
    right: str


class World(Protocol):
    name: str
    error_types: dict[str, str]  # error type -> its lesson, an If/then rule with no problem specifics
    subsets: tuple[str, ...]  # names of the parts its problems fall into (Problem.meta["subset"]); may be empty

    def problems(self, cfg, split: str) -> list:
        """The seeded `split` ('train' or 'eval') of problems (mel_core.problems.problem.Problem)."""

    def random_train_question(self, cfg, rng) -> str:
        """A fresh question outside the held-out part (warm-start data)."""

    def solution_lines(self, question: str) -> list[str]:
        """The correct solution, one step per line, the last ``Answer: ...``."""

    def taught_solution_lines(self, cfg, question: str, rng, stated_rule: str | None = None) -> list[str]:
        """The solution the warm start teaches for `question` (its solve and validation examples' target): the
        correct one, or -- in a world with weak rules -- one that follows them only part of the time, except
        `stated_rule`, the error type whose analysis is in context."""

    def inject_error(self, question: str, error_type: str, rng) -> tuple[list[str], int] | None:
        """An incorrect solution with one error of that type, and the 1-based step where it first differs;
        None where the type does not apply."""

    def analysis_target(self, incorrect_lines: list[str], correct_lines: list[str], error_type: str) -> str:
        """The compact analysis of that error: ``Bifurcation: step k`` / ``Critique: ...`` / ``Heuristic: ...``."""

    def classify_error(self, question: str, incorrect_lines: list[str]) -> str | None:
        """The error type an incorrect solution of `question` makes first (at the step where it parts from the
        correct one); None when it is none of the world's types."""

    def oracle_analysis(self, question: str, incorrect_lines: list[str]) -> str | None:
        """The analysis of an incorrect solution naming its true error type (:meth:`analysis_target` of
        :meth:`classify_error`'s type); None when that is None."""


def named_rules(world: World, heuristics: list[str]) -> list[str]:
    """The world's error types whose lesson a parsed analysis states, in order (text equality up to case,
    spacing and a final period): how a measurement tells whether an analysis names the true rule."""
    norm = lambda t: " ".join(t.lower().rstrip(".").split())
    by_text = {norm(lesson): rule for rule, lesson in world.error_types.items()}
    return [by_text[norm(h)] for h in heuristics if norm(h) in by_text]


def get(name: str) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; one of {', '.join(WORLDS)}")
    return importlib.import_module(f"mel_core.problems.worlds.{name}").WORLD
