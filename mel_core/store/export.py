"""`mel export`: a run's rollouts, analyses, heuristics and lineage as files a training job or notebook loads.

One file per table, Parquet by default (``datasets.load_dataset("parquet", data_files=...)``,
``pyarrow.parquet.read_table``, pandas, DuckDB) or JSON Lines on request. Every row leads with its lineage —
run id, step, policy version, and for analyses and heuristics the ids up the chain (pair, prompt, problem,
both rollouts) and the update and checkpoint that internalized it — so a file stands on its own, without the
store. ``lineage`` is the ``heuristic_lineage`` view (the texts of everything a heuristic came from).
``accepted_only`` keeps the accepted analyses and heuristics and the rollouts of their pairs: the material
MEL trained on.

Reads go through the named reads at the end of this module, on one reader connection (StoreReader: the published
snapshot, so every file shows the same committed state, and the campaign is never blocked). That connection
cannot write files by design, so rows stream out of it as Arrow batches and pyarrow (Parquet) or Python
(JSONL) writes them, each file through a temp sibling renamed into place: a file is the
old export or the new one, never half of one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from mel_core.atomic_files import write_file_atomically
from mel_core.errors import PermanentError
from mel_core.store.query_output import json_value, writing_out
from mel_core.store.reader import StoreReader

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
    with StoreReader(db) as reader, writing_out(f"--out {out}"):
        return [export_table(reader, table, out, accepted_only, fmt) for table in what]


# ------------------------------------------------------------------------------------------ the reads
# Each streams Arrow record batches from a reader (StoreReader.query_batches) and puts the lineage first: the
# run, step and policy version of every row, and for analyses and heuristics the ids up the chain (pair,
# prompt, problem, both rollouts) and the update and checkpoint that internalized them (NULL when none did).

# The accepted analyses' pairs: what --accepted-only keeps of the rollouts.
_ACCEPTED_PAIR_ROLLOUTS = (
    "SELECT unnest([pa.correct_rollout_id, pa.incorrect_rollout_id]) FROM pairs pa "
    "JOIN analyses a ON a.pair_id = pa.pair_id WHERE a.status = 'accepted'")



def export_rollouts(reader, accepted_only: bool):
    """Every rollout with its prompt (text, question, gold answer) and verdict; `accepted_only`: those of the
    pairs whose analysis was accepted (the correct and the incorrect one)."""
    where = f"WHERE r.rollout_id IN ({_ACCEPTED_PAIR_ROLLOUTS})" if accepted_only else ""
    return reader.query_batches(
        "SELECT r.run_id, r.step, r.policy_version_id, r.rollout_id, r.prompt_id, p.problem_id, r.sample_index, "
        "p.question, p.answer, p.prompt_text, r.text, r.token_ids, r.num_tokens, r.finish_reason, r.reward, "
        "r.extracted_answer, r.verify_reason FROM rollouts r LEFT JOIN prompts p ON p.prompt_id = r.prompt_id "
        f"{where} ORDER BY r.run_id, r.step, p.position, r.sample_index, r.rollout_id")


# One update (and its checkpoint) per analysis or heuristic: a step's update internalizes its own step's
# acceptances once; min() keeps one row should a store ever hold two.
_INTERNALIZED_BY = (
    "LEFT JOIN (SELECT {key}, min(update_id) AS update_id FROM internalized GROUP BY {key}) i "
    "ON i.{key} = {alias}.{key} LEFT JOIN updates u ON u.update_id = i.update_id")



def export_analyses(reader, accepted_only: bool):
    """Every analysis (all its columns: the generation, M*, its token ids and parts, status and reason) after its
    lineage; `accepted_only`: status 'accepted'."""
    where = "WHERE a.status = 'accepted'" if accepted_only else ""
    return reader.query_batches(
        "SELECT a.run_id, a.step, a.policy_version_id, a.analysis_id, a.pair_id, pa.prompt_id, pr.problem_id, "
        "pa.correct_rollout_id, pa.incorrect_rollout_id, i.update_id AS internalized_by_update, "
        "u.checkpoint_out AS internalized_in_checkpoint, "
        "a.* EXCLUDE (run_id, step, policy_version_id, analysis_id, pair_id) "
        "FROM analyses a LEFT JOIN pairs pa ON pa.pair_id = a.pair_id "
        "LEFT JOIN prompts pr ON pr.prompt_id = pa.prompt_id "
        f"{_INTERNALIZED_BY.format(key='analysis_id', alias='a')} {where} ORDER BY a.run_id, a.step, a.analysis_id")



def export_heuristics(reader, accepted_only: bool):
    """Every heuristic (text, accepted, cluster) after its lineage; `accepted_only`: those whose replay verified."""
    where = "WHERE h.accepted" if accepted_only else ""
    return reader.query_batches(
        "SELECT h.run_id, h.step, a.policy_version_id, h.heuristic_id, h.analysis_id, a.pair_id, pa.prompt_id, "
        "pr.problem_id, pa.correct_rollout_id, pa.incorrect_rollout_id, i.update_id AS internalized_by_update, "
        "u.checkpoint_out AS internalized_in_checkpoint, h.* EXCLUDE (heuristic_id, analysis_id, run_id, step) "
        "FROM heuristics h LEFT JOIN analyses a ON a.analysis_id = h.analysis_id "
        "LEFT JOIN pairs pa ON pa.pair_id = a.pair_id LEFT JOIN prompts pr ON pr.prompt_id = pa.prompt_id "
        f"{_INTERNALIZED_BY.format(key='heuristic_id', alias='h')} {where} "
        "ORDER BY h.run_id, h.step, h.analysis_id, h.position, h.heuristic_id")



def export_lineage(reader, accepted_only: bool):
    """The heuristic_lineage view, row for row (texts of both rollouts, question, analysis, checkpoint)."""
    where = "WHERE accepted" if accepted_only else ""
    return reader.query_batches(f"SELECT * FROM heuristic_lineage {where} ORDER BY run_id, step, heuristic_id")


# What can be exported, in the order files are written, and the named read of each.
READS: dict[str, Callable] = {
    "rollouts": export_rollouts,
    "analyses": export_analyses,
    "heuristics": export_heuristics,
    "lineage": export_lineage,
}
