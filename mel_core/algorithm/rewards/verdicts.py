"""What a verification says (reward, the answer read, why) and the gold answers it compares against."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any

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


# ------------------------------------------------------------------------------------------- gold answers

_GSM8K_MARK = "####"
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_gold(value: Any) -> str:
    """A dataset answer as a string: ints as is, integral floats as ints (``27.0`` -> ``"27"``), strings stripped.

    GSM8K rationales (``"... #### 1,000"``) become the text after the last ``####`` with comma thousands
    separators removed (``"1000"``). Other strings keep their commas (``"(1,2)"`` is a LaTeX tuple).
    Raises ``TypeError``/``ValueError`` for values that are not answers (None, bool, NaN, inf).
    """
    if isinstance(value, bool) or value is None:
        raise TypeError(f"not a gold answer: {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"not a gold answer: {value!r}")
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"not a gold answer: {type(value).__name__}")
    s = value.strip()
    if _GSM8K_MARK in s:
        s = s.rsplit(_GSM8K_MARK, 1)[1].strip()
        if _THOUSANDS.match(s):
            s = s.replace(",", "")
    return s


