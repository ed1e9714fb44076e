"""The embedded worlds' reward: the last ``Answer:`` line, an exact integer (or text) match."""

from __future__ import annotations

import math
import re
from typing import Any

from mel_core.algorithm.rewards.verdicts import (
    CORRECT,
    NO_ANSWER,
    WRONG,
    GoldError,
    Verdict,
    error_verdict,
    normalize_gold,
)

# ------------------------------------------------------------------------------------------- synthetic task

_ANSWER_LINE = re.compile(r"^[ \t]*Answer:(.*)$", re.MULTILINE)
_INTEGER = re.compile(r"^\s*(-?\d+)\s*$")


def _last_answer_line(text: str | None) -> str | None:
    """What follows ``Answer:`` on the LAST such line, stripped; None when there is no such line."""
    if not isinstance(text, str) or not text:
        return None
    last = None
    for m in _ANSWER_LINE.finditer(text):
        last = m
    return None if last is None else last.group(1).strip()


def extract_synthetic_answer(text: str | None) -> str | None:
    """The integer on the LAST ``Answer:`` line (``"Answer: -12"`` -> ``"-12"``), or None.

    Only the last ``Answer:`` line counts: if it does not hold exactly one integer (optional leading minus,
    surrounding spaces allowed) the text has no answer, even when an earlier line did. The integer is returned in
    canonical form (``"007"`` -> ``"7"``, ``"-0"`` -> ``"0"``).
    """
    content = _last_answer_line(text)
    m = _INTEGER.match(content) if content is not None else None
    return None if m is None else str(int(m.group(1)))


def extract_synthetic_text(text: str | None) -> str | None:
    """The whole content of the LAST ``Answer:`` line, stripped (``"Answer:  three "`` -> ``"three"``), or None
    when there is no such line or it is empty: the answer of a world whose answers are not integers."""
    return _last_answer_line(text) or None


def _gold_int(gold: Any) -> int:
    g = normalize_gold(gold)
    m = _INTEGER.match(g)
    if m is None:
        try:  # "27.0" as a string
            f = float(g)
        except ValueError:
            raise GoldError(f"synthetic gold is not an integer: {g!r}") from None
        if not (math.isfinite(f) and f.is_integer()):
            raise GoldError(f"synthetic gold is not an integer: {g!r}")
        return int(f)
    return int(m.group(1))


def _is_integer_gold(gold: Any) -> bool:
    try:
        _gold_int(gold)
    except (GoldError, TypeError, ValueError):
        return False
    return True


def verify_synthetic(text: str | None, gold: Any) -> Verdict:
    """The last ``Answer:`` line against ``gold``; never raises.

    An integer gold (``7``, ``"-12"``, ``27.0``) needs exactly one integer there, compared as integers (``007`` is
    7; ``"Answer: seven"`` has no answer). Any other gold (the rules world's ``"three"``) is compared as a string:
    the line's whole content, stripped, must equal the stripped gold exactly (case and inner spaces count).
    """
    if not _is_integer_gold(gold):
        try:
            g = normalize_gold(gold)
            if not g:
                raise GoldError("synthetic gold is empty")
        except Exception as e:
            return error_verdict(e, extract_synthetic_text(text))
        extracted = extract_synthetic_text(text)
        if extracted is None:
            return Verdict(0.0, None, NO_ANSWER)
        return Verdict(1.0, extracted, CORRECT) if extracted == g else Verdict(0.0, extracted, WRONG)
    try:
        extracted = extract_synthetic_answer(text)
    except Exception as e:  # pragma: no cover - the regexes do not raise on str input
        return error_verdict(e)
    g = _gold_int(gold)
    if extracted is None:
        return Verdict(0.0, None, NO_ANSWER)
    return Verdict(1.0, extracted, CORRECT) if int(extracted) == g else Verdict(0.0, extracted, WRONG)


