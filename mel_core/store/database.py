"""Opening a store's DuckDB file: the errors a file can be refused with, the check that it is a mel store that
reads whole, the snapshot readers open, and the read-only settings of a reader's connection.

DuckDB lets one process hold a file for writing and blocks every other process while it does, so readers never
open the campaign's live file: they open the snapshot the writer publishes after every committed stage
(docs/DESIGN.md §4). A reader's connection is read-only by its settings, not by a statement classifier.
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb

from mel_core.errors import PermanentError
from mel_core.store.schema import SCHEMA_VERSION

DB_FILE = "mel.duckdb"  # a run directory's store (its snapshot: snapshot_path)


class StoreError(RuntimeError):
    pass


class ReadOnlyViolation(StoreError, PermanentError):
    """A statement a reader may not run."""


class QueryLimit(StoreError, PermanentError):
    """A reader's query stopped at one of its limits (memory, time): the message says which, and how to raise it."""


class ForeignStore(StoreError, PermanentError):
    """A file that is not a mel store (not DuckDB, or a DuckDB file of someone else's): never written to."""


class CorruptStore(StoreError, PermanentError):
    """A mel store that cannot be read whole (truncated, damaged): never written to."""


class MissingStore(StoreError, PermanentError):
    """No store at the given path."""


# What a reader's connection may not do, whatever SQL it is given (DuckDB 2.0 settings; see the module doc).
READER_SETTINGS = {
    "enable_external_access": False,       # no COPY TO / EXPORT / ATTACH of files / read_csv / glob / INSTALL
    "autoinstall_known_extensions": False,  # a table function of an extension must not download it
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_persistent_secrets": False,      # CREATE PERSISTENT SECRET would write under ~/.duckdb
    "python_enable_replacements": False,    # the Python API must not scan the caller's variables
    "temp_directory": "",                   # no spill files: a huge query fails instead of writing to disk
}
# Set on the connection once it is open (after a reader's limits, mel_core.store.reader.ReaderLimits), the last one
# locking every setting: no SET / RESET / PRAGMA can undo any of the above, or the limits, afterwards.
READER_SESSION = ("SET enable_progress_bar = false",  # a long query must not draw on the caller's stdout
                  "SET lock_configuration = true")


def snapshot_path(path: str | Path) -> Path:
    """Where the readers' snapshot of a store lives: ``mel.duckdb`` -> ``mel.snapshot.duckdb``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.snapshot{path.suffix}")


def _connect_with_retry(path: Path, wait_s: float, read_only: bool, config: dict | None = None):
    """Open, retrying while another process holds the file's lock (another writer mid-write)."""
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=dict(config or {}))
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def connect_writer(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    return _connect_with_retry(path, wait_s, read_only)


def _connect_reader(path: Path, wait_s: float, limits: tuple[str, ...] = ()) -> duckdb.DuckDBPyConnection:
    """A read-only connection with READER_SETTINGS, then the `limits` statements (SET memory_limit, threads) and
    READER_SESSION, which locks them all; a file DuckDB cannot open is named as what it is."""
    try:
        con = _connect_with_retry(path, wait_s, read_only=True, config=READER_SETTINGS)
    except duckdb.IOException as e:
        raise open_error(path, e) from e
    # A process's connections to one file share a DuckDB instance: the first reader set and locked it already
    # (memory_limit and threads are the instance's, so a second reader of the file in the process has the first's).
    if not con.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
        for statement in (*limits, *READER_SESSION):
            con.execute(statement)
    return con


def open_error(path: Path, e: Exception) -> StoreError:
    msg = str(e).splitlines()[0]
    if "not a valid DuckDB database file" in msg:
        return ForeignStore(f"{path} is not a DuckDB file, so not a mel store; nothing was written to it")
    if "lock" in msg.lower():
        return StoreError(f"{path} is held by another process ({msg})")
    return CorruptStore(f"{path} cannot be read ({msg}); nothing was written to it")


def _check_mel_store(con: duckdb.DuckDBPyConnection, path: Path, scan: bool) -> None:
    """ForeignStore unless the file holds mel's meta table with a schema version this code reads; with
    `scan`, CorruptStore unless every table reads whole (a truncated file can open and fail only on the
    blocks it lost: a writer must find out before it appends to it)."""
    try:
        has_meta = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta' AND "
                               "database_name = current_database()").fetchall()[0][0]
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall()) if has_meta else {}
    except duckdb.Error as e:
        raise open_error(path, e) from e
    if "schema_version" not in meta:
        raise ForeignStore(f"{path} is a DuckDB file but not a mel store (no mel meta table); nothing was "
                           f"written to it")
    if not str(meta["schema_version"]).isdigit() or int(meta["schema_version"]) > SCHEMA_VERSION:
        raise ForeignStore(f"{path} is a mel store of a newer schema ({meta['schema_version']}) than this "
                           f"mel reads ({SCHEMA_VERSION}); nothing was written to it")
    if not scan:
        return
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE "
                                        "database_name = current_database()").fetchall()]
    try:
        for t in tables:
            con.execute(f'SELECT count(*), max(hash("{t}")) FROM "{t}"').fetchall()  # reads every column
    except duckdb.Error as e:
        raise CorruptStore(f"{path} is damaged: {str(e).splitlines()[0]}; nothing was written to it (the "
                           f"last published snapshot, if any, is {snapshot_path(path)})") from e


def checked_reader_connection(path: Path, wait_s: float, scan: bool,
                              limits: tuple[str, ...] = ()) -> duckdb.DuckDBPyConnection:
    """A reader's connection to `path` (with the `limits` statements, see _connect_reader) once _check_mel_store
    passed; on failure the connection is closed and the error raised without a traceback that would keep it alive
    (DuckDB's bindings report connections still alive at exit, and an orchestrator may keep a failed run's exception
    for the life of the process)."""
    con = _connect_reader(path, wait_s, limits)
    problem = None
    try:
        _check_mel_store(con, path, scan=scan)
    except StoreError as e:
        problem = e.with_traceback(None)
    if problem is None:
        return con
    con.close()
    del con
    raise problem from None


def verify_store(path: str | Path, lock_wait_s: float = 60.0) -> None:
    """ForeignStore / CorruptStore unless `path` is a mel store that reads whole; reads only (what a writer
    checks before its first write to an existing file, and `mel run` before Prefect starts)."""
    checked_reader_connection(Path(path), lock_wait_s, scan=True).close()



def rows_of(cur) -> list[dict]:
    """A DuckDB result as a list of dicts, column name -> value."""
    cols = [d[0] for d in cur.description] if cur.description else []
    return [dict(zip(cols, row)) for row in cur.fetchall()]
