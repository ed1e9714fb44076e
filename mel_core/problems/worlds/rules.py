"""The embedded rules world: a dial stepped by commands, where every solution step is a decision of which rule
applies, and a warm start that leaves the exception rules weak, so the policy's errors are systematic rule errors a
stated lesson fixes (docs/WORLDS.md: the machine, the rules, weak rules, splits by rule)."""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from types import SimpleNamespace

from mel_core.problems.problem import DataError, Problem
from mel_core.problems.worlds import Decision
from mel_core.problems.worlds.compact import compact_analysis, first_difference
from mel_core.vocabulary import RULES_EXCEPTION_RULES

NAME = "rules"
ANSWER_PREFIX = "Answer: "
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("inc", "dec", "dbl", "neg")

# Tag -> lesson: the rule that applies, named by the word the solution step writes for it.
ERROR_TYPES: dict[str, str] = {
    "skip": "If a command repeats the previous command, then skip it.",
    "jump": "If inc meets an odd digit, then jump.",
    "up": "If inc meets an even digit, then go up.",
    "stay": "If dec meets the lowest digit, then stay.",
    "down": "If dec meets a digit above the lowest, then go down.",
    "double": "If the command is dbl, then double.",
    "mirror": "If the command is neg, then mirror.",
}
EXCEPTION_RULES = RULES_EXCEPTION_RULES  # the config names them (mel_core.vocabulary)
PLAIN = "plain"
SUBSETS = (PLAIN,) + EXCEPTION_RULES

_EFFECTS = {
    "skip": lambda d: d, "jump": lambda d: (d + 2) % 10, "up": lambda d: (d + 1) % 10, "stay": lambda d: d,
    "down": lambda d: (d - 1) % 10, "double": lambda d: 2 * d % 10, "mirror": lambda d: 9 - d,
}
# What a solver that breaks a rule writes instead: for the exception rules, the rule that would apply without
# them (skip: the command's own rule, see _broken_tag); for the others, another command's rule, chosen so that
# no two error types share a pair of tags {wrong, right} -- the tags at the bifurcation step then tell which
# rule was broken whichever solution they come from, and an analysis need not get the two apart to name it.
_CONFUSION = {"jump": "up", "stay": "down", "up": "down", "down": "mirror", "double": "mirror", "mirror": "up"}

_QUESTION = re.compile(rf"^({'|'.join(DIGITS)}): ((?:{'|'.join(COMMANDS)})(?: (?:{'|'.join(COMMANDS)}))*)$")
_STEP_LINE = re.compile(rf"^(\d+) ({'|'.join(COMMANDS)}) ({'|'.join(DIGITS)}) ({'|'.join(ERROR_TYPES)}) "
                        rf"({'|'.join(DIGITS)})$")


# ------------------------------------------------------------------------------------------- solving


def parse_question(question: str) -> tuple[int, list[str]]:
    """``"five: inc dec"`` -> (5, ["inc", "dec"])."""
    m = _QUESTION.match(question.strip())
    if not m:
        raise ValueError(f"not a rules-world question: {question!r}")
    return DIGITS.index(m[1]), m[2].split()


def format_question(start: int, commands: list[str]) -> str:
    return f"{DIGITS[start]}: {' '.join(commands)}"


def rule_for(command: str, previous: str | None, digit: int) -> str:
    """The tag of the rule that applies to `command` on `digit` after `previous` (None for the first)."""
    if command == previous:
        return "skip"
    if command == "inc":
        return "jump" if digit % 2 else "up"
    if command == "dec":
        return "stay" if digit == 0 else "down"
    return "double" if command == "dbl" else "mirror"


def _broken_tag(tag: str, command: str, digit: int) -> str:
    """The tag a solver writes where rule `tag` applies but it breaks that rule."""
    return rule_for(command, None, digit) if tag == "skip" else _CONFUSION[tag]


@dataclass(frozen=True)
class Step:
    number: int  # 1-based: written first on its line, so an analysis names its bifurcation step by copying it
    command: str
    before: int
    tag: str

    @property
    def after(self) -> int:
        return _EFFECTS[self.tag](self.before)

    @property
    def line(self) -> str:
        return f"{self.number} {self.command} {DIGITS[self.before]} {self.tag} {DIGITS[self.after]}"


def _run(question: str, choose) -> list[Step]:
    """The steps of a solver that picks each step's tag with choose(index, command, previous, digit)."""
    digit, commands = parse_question(question)
    steps: list[Step] = []
    for i, command in enumerate(commands):
        step = Step(i + 1, command, digit, choose(i, command, commands[i - 1] if i else None, digit))
        steps.append(step)
        digit = step.after
    return steps


def _lines(steps: list[Step], start: int) -> list[str]:
    final = steps[-1].after if steps else start
    return [s.line for s in steps] + [f"{ANSWER_PREFIX}{DIGITS[final]}"]


def solve(question: str) -> list[Step]:
    return _run(question, lambda i, command, previous, digit: rule_for(command, previous, digit))


def solution_lines(question: str) -> list[str]:
    """One line per command (command, digit before, rule tag, digit after), then ``Answer: <digit>``."""
    return _lines(solve(question), parse_question(question)[0])


def answer(question: str) -> str:
    return solution_lines(question)[-1].removeprefix(ANSWER_PREFIX)


def exception_steps(question: str) -> list[str]:
    """The exception rules of the correct solution, one per step where one applies, in order."""
    return [s.tag for s in solve(question) if s.tag in EXCEPTION_RULES]


def subset_of(question: str) -> str | None:
    """plain, skip, jump or stay (docs/WORLDS.md, "Splits, by rule"); None when the question exercises several exceptions, or one
    whose breaking leaves the answer right (``dbl zero skip zero``: a solver without the rule gets it right too)."""
    exceptions = exception_steps(question)
    if not exceptions:
        return PLAIN
    if len(exceptions) > 1 or inject_error(question, exceptions[0], random.Random(0)) is None:
        return None
    return exceptions[0]


def taught_solution_lines(cfg, question: str, rng: random.Random, stated_rule: str | None = None) -> list[str]:
    """The solution the warm start teaches: the correct one, except that where a weak rule applies it is followed
    only with probability `cfg.rules.weak_rate` (else the rule a solver without it applies, itself weak or not) --
    unless it is `stated_rule`, the rule a hint in context states, which is always followed."""
    weak, rate = set(cfg.rules.weak_rules), cfg.rules.weak_rate

    def choose(i: int, command: str, previous: str | None, digit: int) -> str:
        tag = rule_for(command, previous, digit)
        while tag in weak and tag != stated_rule and rng.random() >= rate:
            tag = _broken_tag(tag, command, digit)
        return tag

    return _lines(_run(question, choose), parse_question(question)[0])


# ------------------------------------------------------------------------------------------ problems

_EVAL_SHARE = 1 / 8  # share of the question space reserved for the held-out split


def _is_eval_question(question: str, seed: int) -> bool:
    """A fixed, seeded partition of the question space, so the splits are disjoint whatever their sizes."""
    h = int.from_bytes(hashlib.sha256(f"rules:{seed}:{question}".encode()).digest()[:8], "big")
    return h < _EVAL_SHARE * 2**64


def random_question(cfg, rng: random.Random) -> str:
    n = rng.randint(cfg.rules.min_commands, cfg.rules.max_commands)
    return format_question(rng.randrange(10), [rng.choice(COMMANDS) for _ in range(n)])


def _question_of_subset(cfg, rng: random.Random, subset: str, want_eval: bool, exclude: set[str],
                        tries: int = 100_000) -> str | None:
    """A random question of `subset` in the wanted part of the space, not in `exclude`; None after `tries`."""
    for _ in range(tries):
        q = random_question(cfg, rng)
        if q not in exclude and subset_of(q) == subset and _is_eval_question(q, cfg.seed) == want_eval:
            return q
    return None


def random_train_question(cfg, rng: random.Random) -> str:
    """A fresh question outside the held-out part of the space, of a subset drawn uniformly (warm-start data)."""
    while True:
        q = _question_of_subset(cfg, rng, rng.choice(SUBSETS), False, set())
        if q is not None:
            return q


def _draw_questions(cfg, split: str, count: int) -> tuple[str, ...]:
    return _draw_questions_cached(cfg.seed, split, count, cfg.rules.min_commands, cfg.rules.max_commands)


@functools.lru_cache(maxsize=8)  # a campaign loads its splits at every evaluation; drawing takes ~1 s
def _draw_questions_cached(seed: int, split: str, count: int, min_commands: int,
                           max_commands: int) -> tuple[str, ...]:
    """`count` distinct questions of `split`'s part of the space, the subsets in turn, drawn with a seeded RNG."""
    cfg = SimpleNamespace(seed=seed, rules=SimpleNamespace(min_commands=min_commands, max_commands=max_commands))
    rng = random.Random(f"rules:{seed}:{split}")
    seen: set[str] = set()
    out: list[str] = []
    for i in range(count):
        q = _question_of_subset(cfg, rng, SUBSETS[i % len(SUBSETS)], split == "eval", seen)
        if q is None:
            raise DataError(f"rules world: cannot draw {count} distinct {split} problems of every subset (commands "
                            f"{min_commands}..{max_commands}); lower the split size or allow longer problems")
        seen.add(q)
        out.append(q)
    return tuple(out)


def problems(cfg, split: str) -> list[Problem]:
    """The seeded, deterministic train or eval split; the two never share a question."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    size = cfg.train_size if split == "train" else cfg.eval_size
    return [Problem(f"synthetic:{split}:{i}", q, answer(q), "synthetic",
                    {"subset": subset_of(q), "num_commands": len(parse_question(q)[1])})
            for i, q in enumerate(_draw_questions(cfg, split, size))]


# ------------------------------------------------------------------------------------------ error model


def inject_error(question: str, error_type: str, rng: random.Random) -> tuple[list[str], int] | None:
    """An incorrect solution that breaks rule `error_type` at one step where it applies and follows the rules
    from the wrong digit on; and the 1-based index of that step. None where the rule applies nowhere, or where
    breaking it leaves the answer right (no error to learn from)."""
    if error_type not in ERROR_TYPES:
        raise ValueError(f"unknown error type {error_type!r}; one of {sorted(ERROR_TYPES)}")
    right = solution_lines(question)
    positions = [i for i, s in enumerate(solve(question)) if s.tag == error_type]
    rng.shuffle(positions)
    for at in positions:
        def choose(i: int, command: str, previous: str | None, digit: int, at: int = at) -> str:
            tag = rule_for(command, previous, digit)
            return _broken_tag(tag, command, digit) if i == at else tag

        wrong = _lines(_run(question, choose), parse_question(question)[0])
        if wrong[-1] != right[-1]:
            return wrong, at + 1
    return None


def classify_error(question: str, incorrect_lines: list[str]) -> str | None:
    """The rule an incorrect solution broke first: the tag that applies at the first step where it parts from
    the correct solution, when it wrote another tag there. None when the solutions do not part at a decision
    (a miscopied command or digit, a wrong digit after the right tag, a missing or malformed step, a wrong
    ``Answer:`` line after right steps) or do not part at all."""
    right = solution_lines(question)
    wrong = [line.strip() for line in incorrect_lines if line.strip()]
    try:
        k = first_difference(wrong, right)
    except ValueError:
        return None
    if k > min(len(wrong), len(right) - 1):  # past the last step: a missing step or the Answer line
        return None
    w, r = _STEP_LINE.match(wrong[k - 1]), _STEP_LINE.match(right[k - 1])
    if w is None or (w[1], w[2], w[3]) != (r[1], r[2], r[3]) or w[4] == r[4]:
        return None
    return r[4]


def analysis_target(incorrect_lines: list[str], correct_lines: list[str], error_type: str) -> str:
    """``Bifurcation: step k`` / ``Critique: <wrong line> should be <right line>.`` / ``Heuristic: <lesson>``."""
    return compact_analysis(incorrect_lines, correct_lines, ERROR_TYPES[error_type])


def oracle_analysis(question: str, incorrect_lines: list[str]) -> str | None:
    """The analysis a perfect analyst writes of an incorrect solution: the true first broken rule's lesson
    (:func:`classify_error`); None when no rule was broken."""
    error_type = classify_error(question, incorrect_lines)
    if error_type is None:
        return None
    wrong = [line.strip() for line in incorrect_lines if line.strip()]
    return analysis_target(wrong, solution_lines(question), error_type)


def decision_points(question: str) -> list[Decision]:
    """Every step of the correct solution as a decision among the seven rules: the text up to the tag (the step's
    number, command and digit before) and each rule's tag as its continuation (one token with tokenizer: words)."""
    lines = solution_lines(question)
    out = []
    for i, step in enumerate(solve(question)):
        head = "".join(f"{line}\n" for line in lines[:i])
        out.append(Decision(step.number, f"{head}{step.number} {step.command} {DIGITS[step.before]}",
                            tuple(ERROR_TYPES), tuple(f" {tag}" for tag in ERROR_TYPES), step.tag))
    return out


def weak_rules(cfg) -> tuple[str, ...]:
    """The rules the warm start teaches only part of the time (data.synthetic.rules.weak_rules)."""
    return tuple(cfg.rules.weak_rules)


class RulesWorld:
    """The world's functions behind the mel_core.problems.worlds.World interface."""
    name = NAME
    error_types = ERROR_TYPES
    subsets = SUBSETS

    def problems(self, cfg, split: str) -> list[Problem]:
        return problems(cfg, split)

    def random_train_question(self, cfg, rng: random.Random) -> str:
        return random_train_question(cfg, rng)

    def solution_lines(self, question: str) -> list[str]:
        return solution_lines(question)

    def taught_solution_lines(self, cfg, question: str, rng: random.Random,
                              stated_rule: str | None = None) -> list[str]:
        return taught_solution_lines(cfg, question, rng, stated_rule)

    def inject_error(self, question: str, error_type: str, rng: random.Random) -> tuple[list[str], int] | None:
        return inject_error(question, error_type, rng)

    def analysis_target(self, incorrect_lines: list[str], correct_lines: list[str], error_type: str) -> str:
        return analysis_target(incorrect_lines, correct_lines, error_type)

    def classify_error(self, question: str, incorrect_lines: list[str]) -> str | None:
        return classify_error(question, incorrect_lines)

    def oracle_analysis(self, question: str, incorrect_lines: list[str]) -> str | None:
        return oracle_analysis(question, incorrect_lines)

    def decision_points(self, question: str) -> list[Decision]:
        return decision_points(question)

    def weak_rules(self, cfg) -> tuple[str, ...]:
        return weak_rules(cfg)


WORLD = RulesWorld()
