"""Problem sources: local data files (JSONL, Parquet, Arrow, ``datasets`` folders), and the embedded synthetic worlds
(mel_core.problems.worlds).

``load_problems(cfg.data)`` is what a campaign trains on: ``data.source: synthetic`` is the embedded world
``data.synthetic.world`` (its seeded train or held-out split), anything else the path of a file or folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mel_core.config import DataConfig
from mel_core.problems import worlds
from mel_core.problems.problem import DataError, MissingDataFile, Problem, normalize_gold

__all__ = [
    "SYNTHETIC_SOURCE",
    "DataError",
    "Fields",
    "MissingDataFile",
    "Problem",
    "field_value",
    "held_out",
    "load_file",
    "load_jsonl",
    "load_problems",
    "source_name",
    "strip_math_mode",
]

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


# ------------------------------------------------------------------------------------------- rows of a file

_TABLE_SUFFIXES = (".parquet", ".arrow")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file; DataError naming the line for a bad one."""
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
            yield lineno, row


def _table_rows(path: Path) -> list[dict]:
    """The rows of a local table, read by the libraries that wrote it: a Parquet file or a folder of them
    (pyarrow), an Arrow file (``datasets.Dataset.from_file``), a ``save_to_disk`` folder (``datasets.load_from_disk``;
    of a DatasetDict, its ``train`` split, else its only one)."""
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded and len(loaded) != 1:
                    raise DataError(f"{path}: a dataset with splits {sorted(loaded)} and none named 'train'; name "
                                    f"one split's folder as data.source ({path}/<split>)")
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            return loaded.to_list()
        if path.suffix == ".arrow":
            import datasets

            return datasets.Dataset.from_file(str(path)).to_list()
        import pyarrow.parquet as pq

        if path.is_dir() and not any(path.rglob("*.parquet")):
            raise DataError(f"{path}: a folder with no Parquet files and no saved dataset (save_to_disk) in it")
        return pq.read_table(str(path)).to_pylist()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 (pyarrow/datasets raise many kinds: say why in their own words)
        raise DataError(f"{path}: cannot read it as a table ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None


def _rows(path: Path) -> Iterator[tuple[str, int, dict]]:
    """(where, position, row) of each row of a problem file: JSONL lines (position: the line number) or the rows of
    a table (position: the 1-based row number); ``where`` is what an error names."""
    if path.is_dir() or path.suffix in _TABLE_SUFFIXES:
        for i, row in enumerate(_table_rows(path), start=1):
            yield f"{path} row {i}", i, row
    else:
        for lineno, row in _jsonl_rows(path):
            yield f"{path}:{lineno}", lineno, row


# ------------------------------------------------------------------------------------------- fields of a row

_MISSING = object()


def field_value(row: dict, name: str) -> Any:
    """The value of field ``name`` in ``row``: a top-level key, else a dotted path through nested objects and lists
    (``extra_info.question``, ``prompt.0.content``); a sentinel when there is none."""
    if name in row:
        return row[name]
    value: Any = row
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _turns(messages: Any) -> list[tuple[str, str]] | None:
    """(role, content) of chat-style messages (a list of {"role", "content"} objects), or None if it is not one."""
    if not isinstance(messages, list) or not messages:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages):
        return None
    return [(m["role"], m["content"]) for m in messages]


def _from_messages(turns: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(question, answer) of a chat record: the last user turn, and the assistant turn after it (None if none)."""
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not users:
        return None, None
    answers = [content for role, content in turns[users[-1] + 1:] if role == "assistant"]
    return turns[users[-1]][1], (answers[-1] if answers else None)


@dataclass(frozen=True)
class Fields:
    """Where a row holds its question, gold answer and id (each a field name or dotted path), and the field of a
    chat-style record (a list of role/content messages) used when the row has no question field."""
    question: str = "problem"
    answer: str = "answer"
    id: str = ""
    messages: str = "messages"

    @classmethod
    def of(cls, cfg: DataConfig) -> Fields:
        return cls(cfg.question_field, cfg.answer_field, cfg.id_field, cfg.messages_field)


def _missing(where: str, row: dict, name: str, key: str, what: str) -> DataError:
    return DataError(f"{where}: missing field {name!r} (fields: {sorted(row)}); set {key} to the field that holds "
                     f"{what}")


def _question_and_answer(row: dict, where: str, fields: Fields) -> tuple[Any, Any]:
    """The row's question and answer values: its fields, else (question field absent) its chat messages."""
    question, answer = field_value(row, fields.question), field_value(row, fields.answer)
    if question is _MISSING and fields.messages:
        turns = _turns(field_value(row, fields.messages))
        if turns is not None:
            asked, answered = _from_messages(turns)
            if asked is None:
                raise DataError(f"{where}: field {fields.messages!r} has no user message (the question)")
            if answer is _MISSING and answered is None:
                raise DataError(f"{where}: field {fields.messages!r} has no assistant message after the last user "
                                f"message, and there is no field {fields.answer!r}; set data.answer_field to the "
                                f"field that holds the gold answer")
            return asked, (answered if answer is _MISSING else answer)
    if question is _MISSING or question is None:
        raise _missing(where, row, fields.question, "data.question_field",
                       "the question" + (" (or data.messages_field, chat messages)" if fields.messages else ""))
    if answer is _MISSING or answer is None:
        raise _missing(where, row, fields.answer, "data.answer_field", "the gold answer")
    return question, answer


def load_file(path: str | Path, fields: Fields = Fields(), source: str | None = None) -> list[Problem]:
    """Problems from a local file: JSONL (one object per line; blank lines skipped), Parquet (a file or a folder of
    them), Arrow, or a ``datasets`` ``save_to_disk`` folder. Fields may be dotted paths into nested objects; a row
    without the question field that holds chat messages gives its last user turn as the question and, without the
    answer field, the assistant turn after it as the gold answer. Each Problem keeps its row (``Problem.row``).

    Ids are ``<source>:<row id or position>`` (the line number of a JSONL file, the row number of a table). A bad
    row (a gold answer no verifier can use included) raises DataError naming the file and line or row, and the
    config key to set for a missing field; two rows with one id name both; a missing file raises MissingDataFile
    (a DataError and a FileNotFoundError); an empty file raises DataError.
    """
    path = Path(path)
    if not path.exists():
        raise MissingDataFile(f"problem file not found: {path}")
    source = source or source_name(path)
    unit = "rows" if path.is_dir() or path.suffix in _TABLE_SUFFIXES else "lines"
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}  # problem id -> the line or row it was first seen on
    for where, position, row in _rows(path):
        question, answer = _question_and_answer(row, where, fields)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field {fields.question!r} must be a non-empty string")
        try:
            answer = _gold_answer(answer)
        except ValueError as e:
            raise DataError(f"{where}: field {fields.answer!r}: {e}") from None
        if fields.id:
            row_id = field_value(row, fields.id)
            if row_id is _MISSING or row_id is None:
                raise _missing(where, row, fields.id, "data.id_field", "the row id (or leave it empty)")
            row_id = _normalise_answer(row_id)
        else:
            row_id = str(position)
        problem_id = f"{source}:{row_id}"
        if problem_id in first_seen:  # records, evaluations and caches are keyed by it: one problem per id
            raise DataError(f"{path}: {unit} {first_seen[problem_id]} and {position} have the same id {problem_id!r}")
        first_seen[problem_id] = position
        problems.append(Problem(problem_id, question, answer, source,
                                {"line" if unit == "lines" else "row": position}, row=row))
    if not problems:
        raise DataError(f"{path}: no problems (the file is empty)")
    return problems


def load_jsonl(path: str | Path, question_field: str = "problem", answer_field: str = "answer",
               id_field: str = "", source: str | None = None) -> list[Problem]:
    """:func:`load_file` with its fields named one by one (any format it reads, despite the name)."""
    return load_file(path, Fields(question_field, answer_field, id_field), source)


# ------------------------------------------------------------------------------------------- held-out split


def held_out(problems: list[Problem], fraction: float) -> set[str]:
    """The ids of the held-out part of one file (``data.eval_fraction``): the round(fraction * n) problems whose id
    hashes lowest (SHA-256), at least one and never all. Deterministic and independent of row order and seed, so
    every run on the file holds out the same problems and a row added later moves at most one other."""
    n = len(problems)
    k = min(max(1, round(fraction * n)), n - 1)
    if k < 1:
        raise DataError("data.eval_fraction: a file of one problem cannot be split (none would be left to train on)")
    ranked = sorted(problems, key=lambda p: hashlib.sha256(p.problem_id.encode("utf-8")).hexdigest())
    return {p.problem_id for p in ranked[:k]}


def source_name(path: Path) -> str:
    """``data/amc23/test.jsonl`` -> ``amc23``; ``problems.jsonl`` -> ``problems``."""
    stem = path.name.split(".")[0]
    generic = {"test", "train", "eval", "validation", "dev", "data", "problems"}
    return path.parent.name if stem in generic and path.parent.name else stem


def load_problems(cfg: DataConfig, split: str = "train") -> list[Problem]:
    """The configured problems of a split ("train" or "eval"): the synthetic world's, else the file's. A file is
    the training split; its held-out "eval" split is data.eval_source (another file, read with the same fields) or
    the data.eval_fraction of it that :func:`held_out` picks (then left out of "train")."""
    if cfg.source == SYNTHETIC_SOURCE:
        return worlds.get(cfg.synthetic.world).problems(cfg.synthetic, split)
    from mel_core.config import resolve_path

    if split == "eval" and cfg.eval_source:
        return load_file(resolve_path(cfg.eval_source), Fields.of(cfg))
    problems = load_file(resolve_path(cfg.source), Fields.of(cfg))
    if cfg.eval_fraction > 0:
        eval_ids = held_out(problems, cfg.eval_fraction)
        return [p for p in problems if (p.problem_id in eval_ids) == (split == "eval")]
    if split == "eval":
        raise DataError(f"{cfg.source} has no held-out split: set data.eval_fraction (a part of it) or "
                        f"data.eval_source (another file)")
    return problems
