"""What a training or evaluation problem is, and the error a problem source raises (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
