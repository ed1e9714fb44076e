"""Finding a run the user names (`mel report`, `mel rescore`, `mel run --fork`): a DuckDB file, a run directory,
a run name under the runs root, or a run id. Runs copied into a fork's store as lineage references
(``runs.copied_from``) are never picked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mel_core.errors import PermanentError
from mel_core.store import run_reads
from mel_core.store.database import DB_FILE
from mel_core.store.reader import StoreReader


class RunNotFound(PermanentError, LookupError):
    """The named run is not there: not a store, not a run directory, no such name or id."""


@dataclass(frozen=True)
class RunRef:
    """Which run: its DuckDB file and, if known, its id or name."""
    db: Path
    run_id: str | None = None
    name: str | None = None


def resolve_run(run: str, runs_root: str | Path = "runs") -> RunRef:
    """RUN as a DuckDB path, a run directory, a run name under `runs_root`, or a run id found there."""
    p = Path(run)
    if p.is_dir() and (p / DB_FILE).exists():
        return RunRef(p / DB_FILE)
    if p.is_file():
        return RunRef(p)
    root = Path(runs_root)
    if (root / run / DB_FILE).exists():
        return RunRef(root / run / DB_FILE, name=run)
    for db in sorted(root.glob(f"*/{DB_FILE}")):
        try:
            with StoreReader(db, lock_wait_s=5) as reader:
                hit = run_reads.run_with_id(reader, run)
        except Exception:  # not a mel store, or unreadable: look further
            continue
        if hit:
            return RunRef(db, run_id=run)
    raise RunNotFound(f"no run {run!r}: not a DuckDB file or run directory, not a run name under {root}/, "
                      f"and no {root}/*/{DB_FILE} holds a run with that id")


def pick_run(store: StoreReader, ref: RunRef) -> dict:
    """The runs row `ref` means: its id; else the latest of its name; else the latest run of the file. Runs copied
    into a fork's store as lineage references (runs.copied_from, absent in older stores) are never picked."""
    runs = [r for r in run_reads.runs_by_creation(store) if not r.get("copied_from")]
    if ref.run_id:
        runs = [r for r in runs if r["run_id"] == ref.run_id]
    elif ref.name:
        runs = [r for r in runs if r["name"] == ref.name] or runs
    if not runs:
        raise RunNotFound(f"{ref.db}: no run {ref.run_id or ''} recorded")
    return runs[-1]  # the latest, when a file holds several runs of one name (configs that changed)
