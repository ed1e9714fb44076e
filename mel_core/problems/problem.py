"""What a training or evaluation problem is, what a gold answer is, and the error a problem source raises (a
leaf module)."""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from mel_core.errors import PermanentError


class DataError(PermanentError, ValueError):
    """A problem source that cannot be read: the message names the file and, for a bad row, its line."""


class MissingDataFile(DataError, FileNotFoundError):
    """A problem file that is not there: permanent (a retry cannot make it appear), still a FileNotFoundError."""


@dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str
    answer: str
    source: str
    meta: dict = field(default_factory=dict)
    # The data row it was read from, as the file holds it (nested fields included; {} for the embedded worlds): what
    # a reward plug-in (verify.reward: module:function) is given beside the completion. Not part of equality.
    row: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def row_json(self) -> str | None:
        """:attr:`row` as the store keeps it (prompts.row_json, eval_samples.row_json), None when there is none: what
        a reward plug-in is given again when `mel rescore` verifies a stored record."""
        return json.dumps(self.row, ensure_ascii=False, sort_keys=True, default=str) if self.row else None


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
