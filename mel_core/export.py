"""`mel export`: a run's rollouts, analyses, heuristics and lineage as files a training job or notebook loads.

One file per table, Parquet by default (``datasets.load_dataset("parquet", data_files=...)``,
``pyarrow.parquet.read_table``, pandas, DuckDB) or JSON Lines on request. Every row leads with its lineage —
run id, step, policy version, and for analyses and heuristics the ids up the chain (pair, prompt, problem,
both rollouts) and the update and checkpoint that internalized it — so a file stands on its own, without the
store. ``lineage`` is the ``heuristic_lineage`` view (the texts of everything a heuristic came from).
``accepted_only`` keeps the accepted analyses and heuristics and the rollouts of their pairs: the material
MEL trained on.

Reads go through the named reads of mel_core.records on one reader connection (StoreReader: the published
snapshot, so every file shows the same committed state, and the campaign is never blocked). That connection
cannot write files by design, so rows stream out of it as Arrow batches and pyarrow (Parquet) or Python
(JSONL) writes them, each file through a temp sibling renamed into place (mel_core.files): a file is the
old export or the new one, never half of one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from mel_core import records
from mel_core.errors import PermanentError
from mel_core.files import write_file_atomically
from mel_core.store import StoreReader
from mel_core.tabular import json_value

# What can be exported, in the order files are written, and the named read of each.
READS: dict[str, Callable] = {
    "rollouts": records.export_rollouts,
    "analyses": records.export_analyses,
    "heuristics": records.export_heuristics,
    "lineage": records.export_lineage,
}
FORMATS = ("parquet", "jsonl")


class ExportError(PermanentError, ValueError):
    """An export the user asked for that cannot be (bad input: exit 2)."""


@dataclass(frozen=True)
class Exported:
    table: str
    path: Path
    rows: int


def parse_what(text: str | None) -> list[str]:
    """`--what rollouts,heuristics` -> the tables in that order (all of them when empty); ExportError names an
    unknown one."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()] or list(READS)
    unknown = [n for n in names if n not in READS]
    if unknown:
        raise ExportError(f"--what {text}: unknown table {', '.join(map(repr, unknown))}; expected a comma-separated "
                          f"list of {', '.join(READS)}")
    return list(dict.fromkeys(names))  # a table named twice is written once


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return fmt


def write_parquet(batches: pa.RecordBatchReader, tmp: Path) -> int:
    """The batches as one Parquet file with their schema (an empty export is still a file with its columns)."""
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(tmp, batches.schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def write_jsonl(batches: pa.RecordBatchReader, tmp: Path) -> int:
    """The batches as JSON Lines, one object per row, every value whole (lists as arrays, NaN as null)."""
    rows = 0
    with tmp.open("w", encoding="utf-8") as f:
        for batch in batches:
            for row in batch.to_pylist():
                f.write(json.dumps(json_value(row), ensure_ascii=False) + "\n")
            rows += batch.num_rows
    return rows


WRITERS: dict[str, Callable[[pa.RecordBatchReader, Path], int]] = {"parquet": write_parquet, "jsonl": write_jsonl}


def export_table(reader: StoreReader, table: str, out_dir: Path, accepted_only: bool, fmt: str) -> Exported:
    """One table into `out_dir/<table>.<fmt>`, replacing an earlier export of it whole."""
    path = Path(out_dir) / f"{table}.{fmt}"
    written: list[int] = []
    write_file_atomically(path, lambda tmp: written.append(WRITERS[fmt](READS[table](reader, accepted_only), tmp)))
    return Exported(table, path, written[0])


def export_run(db: Path, out_dir: str | Path, what: list[str], accepted_only: bool = False,
               fmt: str = "parquet") -> list[Exported]:
    """Every table of `what` from the store `db` (its published snapshot) into `out_dir`, one file each."""
    check_format(fmt)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory (it is created if missing)")
    with StoreReader(db) as reader:
        return [export_table(reader, table, out, accepted_only, fmt) for table in what]
