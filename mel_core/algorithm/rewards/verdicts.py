"""What a verification says (reward, the answer read, why); ``normalize_gold`` (mel_core.problems.problem) reads
the gold answers it compares against."""

from __future__ import annotations

from dataclasses import dataclass

# What a gold answer is belongs to the problems (the JSONL loader refuses what it refuses); re-exported here, where
# the verifiers normalise each gold before comparing.
from mel_core.problems.problem import normalize_gold  # noqa: F401

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_EXTRACTION = "boxed_last"
DEFAULT_TRUNCATED_REWARD = "zero"
# Bump when the verification logic changes in a way that can change a verdict: it is part of Verifier.identity.
VERIFIER_VERSION = 1

CORRECT = "correct"
WRONG = "wrong_answer"
NO_ANSWER = "no_answer"
TIMEOUT = "timeout"
TRUNCATED = "truncated"
LENGTH = "length"  # the finish_reason of a completion cut at the length limit (mel_core.model.engines.base.Completion)


@dataclass(frozen=True)
class Verdict:
    reward: float
    extracted: str | None
    reason: str


class GoldError(ValueError):
    """A gold answer that cannot be used (empty for the synthetic task, unparsable for math)."""


def error_reason(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}"


def error_verdict(exc: BaseException, extracted: str | None = None) -> Verdict:
    return Verdict(0.0, extracted, error_reason(exc))
