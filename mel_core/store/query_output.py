"""Query results as text and as files: what `mel query` prints (`--format`) and writes (`--out`).

Four printed formats: `table` for reading in a terminal (cells longer than a width are cut, and the footer
says how many were, so nothing is cut silently), `markdown` for pasting into a document, and `csv` and
`json` for programs, which never cut or round anything. A result of one row and one column (``SELECT
count(*) …``) prints as the bare value in csv, so ``n=$(mel query --format csv "SELECT count(*) …")`` is the
number. Files (`--out`) take their format from the suffix: `.csv` and `.json` are what those formats print
(csv always with its header), `.parquet` is the result's Arrow table with DuckDB's column types.

Everything here is pure formatting of rows the caller already read: a reader's DuckDB connection cannot
write files (mel_core.store), so every file is written from Python, whole or not at all (mel_core.atomic_files).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import decimal
import errno
import io
import json
import math
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mel_core.atomic_files import write_file_atomically
from mel_core.errors import PermanentError

PRINT_FORMATS = ("table", "csv", "json", "markdown")
FILE_SUFFIXES = (".csv", ".json", ".parquet")
CUT_MARK = "…"


class OutputError(PermanentError, ValueError):
    """A format, width or output file the user asked for that cannot be (bad input: exit 2)."""


# ------------------------------------------------------------------------------------- values


def json_value(v: Any) -> Any:
    """A DuckDB value as JSON can hold it, exactly: timestamps as ISO 8601 text, decimals as numbers,
    NaN and infinities as null (JSON has none, and a loader would reject the file)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (dt.timedelta, uuid.UUID)):
        return str(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    return v


def csv_cell(v: Any) -> str:
    """A value as one CSV field: full precision, empty for NULL, lists and structs as JSON."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(json_value(v), ensure_ascii=False)
    value = json_value(v)
    return "" if value is None else str(value)


def display_cell(v: Any, newline: str = "\\n") -> str:
    """A value for reading: NULL spelled out, floats to 4 significant digits, one line (newlines as `newline`)."""
    s = "NULL" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    return s.replace("\n", newline)


# ------------------------------------------------------------------------------------- printed formats


def cut(text: str, width: int) -> tuple[str, bool]:
    """`text` within `width` characters (0: no limit), ending in CUT_MARK when it was longer; and whether it was."""
    if width <= 0 or len(text) <= width:
        return text, False
    return text[: width - 1] + CUT_MARK, True


def row_count(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"


def format_table(cols: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """A plain-text table for the terminal; cells longer than `max_width` (0: no limit) are cut, and the
    footer counts them and says how to see them whole."""
    body, n_cut = [], 0
    for r in rows:
        cells = [cut(display_cell(v), max_width) for v in r]
        n_cut += sum(was_cut for _, was_cut in cells)
        body.append([text for text, _ in cells])
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(cols)]
    line = lambda vals: " | ".join(v.ljust(w) for v, w in zip(vals, widths))
    out = [line(cols), "-+-".join("-" * w for w in widths)] + [line(r) for r in body]
    footer = row_count(len(rows))
    if n_cut:
        footer += (f"; {n_cut} cell{'s' if n_cut != 1 else ''} cut to {max_width} characters, ending in {CUT_MARK}: "
                   f"--width 0 shows them whole, --format csv or json never cuts")
    out.append(f"({footer})")
    return "\n".join(out)


def format_csv(cols: Sequence[str], rows: Sequence[Sequence[Any]], bare_scalar: bool = True) -> str:
    """CSV with a header row; with `bare_scalar`, a one-row one-column result is just its value (for shells)."""
    if bare_scalar and len(cols) == 1 and len(rows) == 1:
        return csv_cell(rows[0][0]) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    writer.writerows([csv_cell(v) for v in r] for r in rows)
    return buf.getvalue()


def format_json(cols: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A JSON array with one object per row, keys in column order."""
    return json.dumps([{c: json_value(v) for c, v in zip(cols, r)} for r in rows], ensure_ascii=False, indent=1) + "\n"


def markdown_cell(v: Any) -> str:
    """A value as a GitHub markdown table cell: pipes escaped, newlines as <br> (a row is one line)."""
    return display_cell(v, newline="<br>").replace("|", "\\|")


def format_markdown(cols: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table, every cell whole."""
    out = ["| " + " | ".join(markdown_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(markdown_cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def format_rows(fmt: str, cols: Sequence[str], rows: Sequence[Sequence[Any]], width: int) -> str:
    """`rows` in a printed format (PRINT_FORMATS); only `table` uses `width`. Ends with a newline."""
    if fmt == "table":
        return format_table(cols, rows, max_width=width) + "\n"
    if fmt == "csv":
        return format_csv(cols, rows)
    if fmt == "json":
        return format_json(cols, rows)
    if fmt == "markdown":
        return format_markdown(cols, rows)
    raise OutputError(f"--format {fmt!r}: expected one of {', '.join(PRINT_FORMATS)}")


def check_print_options(fmt: str, width: int) -> None:
    """OutputError for a format that does not exist or a negative width, before any query runs."""
    if fmt not in PRINT_FORMATS:
        raise OutputError(f"--format {fmt!r}: expected one of {', '.join(PRINT_FORMATS)}")
    if width < 0:
        raise OutputError(f"--width {width}: expected a number of characters, or 0 for no limit")


# ------------------------------------------------------------------------------------- files


def file_format(path: str | Path) -> str:
    """'csv', 'json' or 'parquet' from the file's suffix; OutputError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise OutputError(f"--out {path}: the suffix says the format; expected {', '.join(FILE_SUFFIXES)}")
    return suffix[1:]


# Errors of writing a file that say the place the user named is wrong (a directory, read-only, not writable, missing):
# exit 2 with one line; others (disk full, I/O errors) stay the OSError they are (exit 1, one line too).
_BAD_PLACE = {errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENAMETOOLONG}


@contextlib.contextmanager
def writing_out(flag_and_path: str) -> Iterator[None]:
    """Writes to the user's output (`flag_and_path`, e.g. "--out results/x.csv"): an OSError that says the place is
    wrong becomes OutputError, one line naming the flag, the file and the reason."""
    try:
        yield
    except OSError as e:
        if e.errno not in _BAD_PLACE:
            raise
        where = f" ({e.filename})" if e.filename and not flag_and_path.endswith(str(e.filename)) else ""
        raise OutputError(f"{flag_and_path}: cannot write there{where}: {e.strerror or e}") from None


def write_text_file(path: str | Path, text: str) -> Path:
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_parquet_file(path: str | Path, table) -> Path:
    """An Arrow table as one Parquet file (its column types kept: lists, timestamps, decimals)."""
    import pyarrow.parquet as pq

    return write_file_atomically(path, lambda tmp: pq.write_table(table, tmp))
