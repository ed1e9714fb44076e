"""Problem sources: JSONL benchmark files, and the embedded synthetic worlds (mel_core.problems.worlds).

``load_problems(cfg.data)`` is what a campaign trains on: ``data.source: synthetic`` is the embedded world
``data.synthetic.world`` (its seeded train or held-out split), anything else the path of a JSONL file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from mel_core.config import DataConfig
from mel_core.problems import worlds
from mel_core.problems.problem import DataError, MissingDataFile, Problem, normalize_gold

__all__ = ["DataError", "MissingDataFile", "Problem", "load_jsonl", "load_problems", "source_name", "strip_math_mode",
           "SYNTHETIC_SOURCE"]

SYNTHETIC_SOURCE = "synthetic"


# ------------------------------------------------------------------------------------------- JSONL


# An unescaped ``$`` opens or closes math mode; ``\$`` is a dollar sign (MATH-500's ``\$18.90``) and stays.
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")
# A sentence's full stop written after the closing delimiter (OlympiadBench: ``$(-\infty, 0) \cup\{1\}$.``).
_FULL_STOP_AFTER_MATH = re.compile(r"(?<!\\)\$\s*\.$")


def strip_math_mode(answer: str) -> str:
    """An answer written in LaTeX math mode, without its ``$`` delimiters: ``"$69$,$84$"`` -> ``"69,84"``.

    Only answers that *start* in math mode are touched (OlympiadBench writes ``$...$``; GSM8K rationales hold
    ``$`` as a currency sign mid-text and MATH-500 escapes it as ``\\$``). Every unescaped ``$`` goes, stray ones
    inside too (``"$221,$8$"`` -> ``"221,8"``), so the gold is one plain LaTeX expression: what the verifier wraps
    in ``$...$`` itself, what ``eval_samples.answer`` shows, what a reference ``\\boxed{}`` can hold (with a ``$``
    inside the box, the model side no longer parses). Several answers stay comma-separated (``"69,84"``):
    math-verify parses a top-level comma list as a set on both sides, so ``\\boxed{84, 69}`` matches, in any order.
    """
    s = answer.strip()
    if not _MATH_DELIMITER.match(s):
        return s
    s = _FULL_STOP_AFTER_MATH.sub("$", s)
    return _MATH_DELIMITER.sub("", s).strip()


def _normalise_answer(value: Any) -> str:
    """Gold answers as strings; integral floats as integers (AMC's ``27.0`` -> ``"27"``); a list holding one
    answer as that answer (OlympiadBench's ``final_answer: ["$...$"]``); math-mode ``$`` delimiters removed
    (:func:`strip_math_mode`)."""
    if isinstance(value, list) and len(value) == 1:
        return _normalise_answer(value[0])
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return strip_math_mode(value)
    return json.dumps(value, ensure_ascii=False)


def _gold_answer(value: Any) -> str:
    """A row's gold answer, as :func:`_normalise_answer` writes it; ValueError (saying why) for a value no verifier
    can compare against — what ``normalize_gold`` refuses (true/false, NaN, infinity, an object), a list of other
    than one answer, an empty answer — which would otherwise become the text "True", "nan" or '{"x": 1}' and be
    scored as if it were a gold answer."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"a list of {len(value)} values, not an answer (a list may hold one answer)")
        return _gold_answer(value[0])
    try:
        normalize_gold(value)
    except (TypeError, ValueError):
        shown = json.dumps(value, ensure_ascii=False)
        raise ValueError(f"{shown[:60] + ('…' if len(shown) > 60 else '')} is not an answer (a string or a finite "
                         f"number)") from None
    answer = _normalise_answer(value)
    if not normalize_gold(answer):
        raise ValueError(f"{json.dumps(value, ensure_ascii=False)[:60]} is empty once read as an answer")
    return answer


def load_jsonl(path: str | Path, question_field: str = "problem", answer_field: str = "answer",
               id_field: str = "", source: str | None = None) -> list[Problem]:
    """Problems from a JSONL file (one object per line; blank lines skipped).

    Ids are ``<source>:<row id or 1-based line number>``. A bad row (a gold answer no verifier can use included)
    raises DataError naming the file and line, two rows with one id name both lines; a missing file raises
    MissingDataFile (a DataError and a FileNotFoundError); an empty file raises DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataFile(f"problem file not found: {path}")
    source = source or source_name(path)
    problems: list[Problem] = []
    first_line: dict[str, int] = {}  # problem id -> the line it was first seen on
    with path.open("rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line); is this a JSONL "
                                f"file?") from None
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for name in (question_field, answer_field) + ((id_field,) if id_field else ()):
                if name not in row or row[name] is None:
                    raise DataError(f"{where}: missing field {name!r} (fields: {sorted(row)})")
            question = row[question_field]
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{where}: field {question_field!r} must be a non-empty string")
            try:
                answer = _gold_answer(row[answer_field])
            except ValueError as e:
                raise DataError(f"{where}: field {answer_field!r}: {e}") from None
            row_id = _normalise_answer(row[id_field]) if id_field else str(lineno)
            problem_id = f"{source}:{row_id}"
            if problem_id in first_line:  # records, evaluations and caches are keyed by it: one problem per id
                raise DataError(f"{path}: lines {first_line[problem_id]} and {lineno} have the same id {problem_id!r}")
            first_line[problem_id] = lineno
            problems.append(Problem(problem_id, question, answer, source, {"line": lineno}))
    if not problems:
        raise DataError(f"{path}: no problems (the file is empty)")
    return problems


def source_name(path: Path) -> str:
    """``data/amc23/test.jsonl`` -> ``amc23``; ``problems.jsonl`` -> ``problems``."""
    stem = path.name.split(".")[0]
    generic = {"test", "train", "eval", "validation", "dev", "data", "problems"}
    return path.parent.name if stem in generic and path.parent.name else stem


def load_problems(cfg: DataConfig, split: str = "train") -> list[Problem]:
    """The configured problems: the synthetic split, or a JSONL file (one file is one split: `split` is ignored)."""
    if cfg.source == SYNTHETIC_SOURCE:
        return worlds.get(cfg.synthetic.world).problems(cfg.synthetic, split)
    from mel_core.config import resolve_path

    return load_jsonl(resolve_path(cfg.source), cfg.question_field, cfg.answer_field, cfg.id_field)
