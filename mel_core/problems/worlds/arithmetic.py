"""The embedded arithmetic world: step-by-step integer arithmetic with a model of the errors a solver makes.

A question is an expression (``12+7*3-5``); its solution is written one operation per line (every ``*`` first,
then ``+``/``-``, left to right) and ends with ``Answer: N`` (what :mod:`mel_core.algorithm.rewards` checks). The error
model is a fixed set of error types that recur across problems, each with one reusable If/then heuristic that
names no numbers: the tiny model's warm start learns the analysis format from injected errors of these types
(:func:`inject_error`, :func:`analysis_target`), so a heuristic the model writes about one problem can help on
another — the premise of MEL's meta-experience. Splits are seeded and disjoint (a fixed partition of the
question space).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable

from mel_core.problems.problem import DataError, Problem
from mel_core.problems.worlds.compact import compact_analysis, first_difference

NAME = "arithmetic"

# ------------------------------------------------------------------------------ synthetic: solving

ANSWER_PREFIX = "Answer: "
_TOKEN = re.compile(r"\d+|[+\-*]")
_STEP_LINE = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


def parse_question(question: str) -> tuple[list[int], list[str]]:
    """``"12+7*3-5"`` -> ([12, 7, 3, 5], ["+", "*", "-"])."""
    tokens = _TOKEN.findall(question.replace(" ", ""))
    if "".join(tokens) != question.replace(" ", "") or len(tokens) % 2 == 0:
        raise ValueError(f"not a synthetic arithmetic question: {question!r}")
    numbers, ops = [int(t) for t in tokens[0::2]], tokens[1::2]
    if any(op not in "+-*" for op in ops) or any(not t.isdigit() for t in tokens[0::2]):
        raise ValueError(f"not a synthetic arithmetic question: {question!r}")
    return numbers, ops


def _apply(a: int, op: str, b: int) -> int:
    return a * b if op == "*" else a + b if op == "+" else a - b


def _step_line(a: int, op: str, b: int, result: int) -> str:
    return f"{a}{op}{b}={result}"


def _next_op_index(ops: list[str]) -> int:
    """The operation a correct solver does next: the first ``*``, else the leftmost ``+``/``-``."""
    return ops.index("*") if "*" in ops else 0


@dataclass
class _Step:
    """One solving step: which operation (index into the current ops) and the values it combines."""
    index: int
    a: int
    op: str
    b: int
    result: int

    @property
    def line(self) -> str:
        return _step_line(self.a, self.op, self.b, self.result)


# A fault rewrites one step (its operation choice, an operand or its result) given the state before it:
# fault(numbers, ops, derived, step) where derived[i] says numbers[i] is an earlier step's result.
_Fault = Callable[[list[int], list[str], list[bool], _Step], "_Step | None"]


def _solve(question: str, fault_at: int | None = None, fault: _Fault | None = None) -> tuple[list[_Step], int]:
    """Solve step by step; optionally let `fault` rewrite step `fault_at` (0-based) and carry on from it."""
    numbers, ops = parse_question(question)
    derived = [False] * len(numbers)
    steps: list[_Step] = []
    while ops:
        i = _next_op_index(ops)
        step = _Step(i, numbers[i], ops[i], numbers[i + 1], _apply(numbers[i], ops[i], numbers[i + 1]))
        if fault is not None and len(steps) == fault_at:
            step = fault(numbers, ops, derived, step)
            if step is None:
                raise _NotApplicable
        steps.append(step)
        numbers[step.index:step.index + 2] = [step.result]
        derived[step.index:step.index + 2] = [True]
        del ops[step.index]
    return steps, numbers[0]


class _NotApplicable(Exception):
    pass


def evaluate(question: str) -> int:
    """The value of the expression, ``*`` before ``+``/``-``, left to right."""
    return _solve(question)[1]


def solution_lines(question: str) -> list[str]:
    """One line per operation (every ``*`` first, then ``+``/``-``, left to right), then ``Answer: N``."""
    steps, value = _solve(question)
    return [s.line for s in steps] + [f"{ANSWER_PREFIX}{value}"]


def format_solution(lines: list[str]) -> str:
    return "\n".join(lines)


# ----------------------------------------------------------------------------- synthetic: problems

_EVAL_SHARE = 1 / 8  # share of the question space reserved for the held-out split


def _is_eval_question(question: str, seed: int) -> bool:
    """A fixed, seeded partition of the question space, so the splits are disjoint whatever their sizes."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{question}".encode()).digest()[:8], "big")
    return h < _EVAL_SHARE * 2**64


def random_question(cfg, rng: random.Random) -> str:
    n_ops = rng.randint(cfg.min_ops, cfg.max_ops)
    parts = [str(rng.randint(1, cfg.max_number))]
    for _ in range(n_ops):
        parts += [rng.choice(cfg.operators), str(rng.randint(1, cfg.max_number))]
    return "".join(parts)


def random_train_question(cfg, rng: random.Random) -> str:
    """A fresh question outside the held-out part of the space (for warm-start data)."""
    while True:
        q = random_question(cfg, rng)
        if not _is_eval_question(q, cfg.seed):
            return q


def _draw_questions(cfg, split: str, count: int, seed_tag: str,
                    exclude: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct questions of `split`'s part of the space, drawn with a seeded RNG."""
    rng = random.Random(f"{cfg.seed}:{seed_tag}")
    want_eval = split == "eval"
    seen: set[str] = set()
    out: list[str] = []
    attempts, max_attempts = 0, 200 * count + 10_000
    while len(out) < count:
        attempts += 1
        if attempts > max_attempts:
            raise DataError(f"synthetic task: cannot draw {count} distinct {split} problems from the question "
                            f"space (max_ops={cfg.max_ops}, max_number={cfg.max_number}); lower the split size")
        q = random_question(cfg, rng)
        if q in seen or q in exclude or _is_eval_question(q, cfg.seed) != want_eval:
            continue
        seen.add(q)
        out.append(q)
    return out


def synthetic_problems(cfg, split: str) -> list[Problem]:
    """The seeded, deterministic train or eval split; the two never share a question."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if not cfg.operators or any(op not in "+-*" for op in cfg.operators):
        raise DataError(f"synthetic task: operators must be drawn from '+-*', got {cfg.operators!r}")
    size = cfg.train_size if split == "train" else cfg.eval_size
    questions = _draw_questions(cfg, split, size, split)
    return [Problem(f"synthetic:{split}:{i}", q, str(evaluate(q)), "synthetic",
                    {"num_ops": len(parse_question(q)[1])})
            for i, q in enumerate(questions)]


# --------------------------------------------------------------------------- synthetic: error model

# Each rule names a situation and what to do in it, never a number: it must transfer across problems.
ERROR_TYPES: dict[str, str] = {
    "order": "If a * comes after a + or -, then do the * step first.",
    "carry": "If an addition passes a ten, then carry one to the tens.",
    "borrow": "If a subtraction needs more ones than it has, then borrow one from the tens.",
    "sign": "If a subtraction takes away more than it starts with, then keep the minus sign on the result.",
    "times": "If two numbers are multiplied, then take the first one exactly as many times as the second says.",
    "copy": "If a step uses an earlier result, then copy that result exactly.",
}


def _fault_order(numbers: list[int], ops: list[str], derived: list[bool], step: _Step) -> _Step | None:
    # Reading left to right: the +/- just before the first * steals the *'s left operand.
    i = step.index
    if step.op != "*" or i == 0:
        return None
    a, op, b = numbers[i - 1], ops[i - 1], numbers[i]
    return _Step(i - 1, a, op, b, _apply(a, op, b))


def _fault_carry(numbers: list[int], ops: list[str], derived: list[bool], step: _Step) -> _Step | None:
    # Forgetting the carry: the ones digits sum past nine, the tens digit does not go up.
    if step.op != "+" or step.a < 0 or (step.a % 10) + (step.b % 10) < 10:
        return None
    return _Step(step.index, step.a, step.op, step.b, step.result - 10)


def _fault_borrow(numbers: list[int], ops: list[str], derived: list[bool], step: _Step) -> _Step | None:
    # Forgetting the borrow: the ones are subtracted the wrong way round and the tens stay whole.
    if step.op != "-" or step.a <= step.b or (step.a % 10) >= (step.b % 10):
        return None
    return _Step(step.index, step.a, step.op, step.b, step.result + 10)


def _fault_sign(numbers: list[int], ops: list[str], derived: list[bool], step: _Step) -> _Step | None:
    if step.op != "-" or step.result >= 0:
        return None
    return _Step(step.index, step.a, step.op, step.b, -step.result)


def _fault_times(numbers: list[int], ops: list[str], derived: list[bool], step: _Step) -> _Step | None:
    # One group too many or too few: a*(b+1) or a*(b-1); the choice is fixed by the operands.
    if step.op != "*" or step.b < 2:
        return None
    delta = step.a if (step.a + step.b) % 2 == 0 else -step.a
    return _Step(step.index, step.a, step.op, step.b, step.result + delta)


def _fault_copy(numbers: list[int], ops: list[str], derived: list[bool], step: _Step) -> _Step | None:
    # An earlier result copied with its last digit off by one; the arithmetic on it is then right.
    i = step.index
    if derived[i]:
        a, b = _miscopy(step.a), step.b
    elif derived[i + 1]:
        a, b = step.a, _miscopy(step.b)
    else:
        return None
    return _Step(i, a, step.op, b, _apply(a, step.op, b))


def _miscopy(value: int) -> int:
    return value + 1 if value % 2 == 0 else value - 1


_FAULTS: dict[str, _Fault] = {"order": _fault_order, "carry": _fault_carry, "borrow": _fault_borrow,
                              "sign": _fault_sign, "times": _fault_times, "copy": _fault_copy}


def _valid_lines(steps: list[_Step]) -> bool:
    """Solutions write a right operand as a plain number: no step may combine with a negative one."""
    return all(s.b >= 0 for s in steps)


def inject_error(question: str, error_type: str, rng: random.Random) -> tuple[list[str], int] | None:
    """An incorrect solution with one error of `error_type`, continued consistently from the wrong value.

    Returns (lines, k): the lines end with a wrong ``Answer:``, and k is the 1-based index of the first
    wrong line (the bifurcation step). None when the type does not apply to this problem, or when the
    slip would leave the final answer right (then it is no error to learn from).
    """
    if error_type not in ERROR_TYPES:
        raise ValueError(f"unknown error type {error_type!r}; one of {sorted(ERROR_TYPES)}")
    correct, answer = _solve(question)
    positions = list(range(len(correct)))
    rng.shuffle(positions)
    for at in positions:
        try:
            steps, wrong_answer = _solve(question, fault_at=at, fault=_FAULTS[error_type])
        except _NotApplicable:
            continue
        if wrong_answer == answer or not _valid_lines(steps):
            continue
        lines = [s.line for s in steps] + [f"{ANSWER_PREFIX}{wrong_answer}"]
        right = solution_lines(question)
        first_wrong = next(k for k, (w, r) in enumerate(zip(lines, right), start=1) if w != r)
        return lines, first_wrong
    return None


def classify_error(wrong_line: str, right_line: str) -> str | None:
    """The error type behind two differing step lines (``"12+21=23"`` vs ``"12+21=33"`` -> carry), or None."""
    w, r = _STEP_LINE.match(wrong_line.strip()), _STEP_LINE.match(right_line.strip())
    if not w or not r:
        return None
    wa, wop, wb, wres = int(w[1]), w[2], int(w[3]), int(w[4])
    ra, rop, rb, rres = int(r[1]), r[2], int(r[3]), int(r[4])
    if wop in "+-" and rop == "*":
        return "order"
    if wop != rop:
        return None
    if (wa, wb) != (ra, rb):
        # Same operation on a different operand, computed right: an earlier result copied wrong.
        return "copy" if wres == _apply(wa, wop, wb) and (wa == ra or wb == rb) else None
    diff = wres - rres
    if diff == 0:
        return None
    if rres < 0 and wres == -rres:
        return "sign"
    if wop == "+" and abs(diff) == 10:
        return "carry"
    if wop == "-" and abs(diff) == 10:
        return "borrow"
    if wop == "*" and abs(diff) in (ra, rb):
        return "times"
    return None


def analysis_target(incorrect_lines: list[str], correct_lines: list[str], error_type: str) -> str:
    """The compact analysis the tiny model learns: bifurcation step, critique, digit-free heuristic.

    ``Bifurcation: step 2`` / ``Critique: 12+21=34 should be 12+21=33.`` /
    ``Heuristic: If an addition passes a ten, then carry one to the tens.``
    """
    return compact_analysis(incorrect_lines, correct_lines, ERROR_TYPES[error_type])


def classify_first_error(question: str, incorrect_lines: list[str]) -> str | None:
    """The error type of an incorrect solution's first step that parts from the correct one; None when the
    solutions do not part at a step, or that step is no error type of the model (a slip)."""
    right = solution_lines(question)
    wrong = [line.strip() for line in incorrect_lines if line.strip()]
    try:
        k = first_difference(wrong, right)
    except ValueError:
        return None
    return classify_error(wrong[k - 1], right[k - 1]) if k <= min(len(wrong), len(right)) else None


def oracle_analysis(question: str, incorrect_lines: list[str]) -> str | None:
    """The correct compact analysis of a real incorrect solution: its first wrong step, the critique, and the
    lesson of the error type that step shows; None when the step is no error type of the model (a slip)."""
    error_type = classify_first_error(question, incorrect_lines)
    if error_type is None:
        return None
    return analysis_target([line.strip() for line in incorrect_lines if line.strip()], solution_lines(question),
                           error_type)


class ArithmeticWorld:
    """The world's functions behind the mel_core.problems.worlds.World interface."""
    name = NAME
    error_types = ERROR_TYPES
    subsets: tuple[str, ...] = ()

    def problems(self, cfg, split: str) -> list[Problem]:
        return synthetic_problems(cfg, split)

    def random_train_question(self, cfg, rng: random.Random) -> str:
        return random_train_question(cfg, rng)

    def solution_lines(self, question: str) -> list[str]:
        return solution_lines(question)

    def taught_solution_lines(self, cfg, question: str, rng: random.Random,
                              stated_rule: str | None = None) -> list[str]:
        return solution_lines(question)  # no weak rules: the warm start teaches the correct solution

    def inject_error(self, question: str, error_type: str, rng: random.Random) -> tuple[list[str], int] | None:
        return inject_error(question, error_type, rng)

    def analysis_target(self, incorrect_lines: list[str], correct_lines: list[str], error_type: str) -> str:
        return analysis_target(incorrect_lines, correct_lines, error_type)

    def classify_error(self, question: str, incorrect_lines: list[str]) -> str | None:
        return classify_first_error(question, incorrect_lines)

    def oracle_analysis(self, question: str, incorrect_lines: list[str]) -> str | None:
        return oracle_analysis(question, incorrect_lines)


WORLD = ArithmeticWorld()
