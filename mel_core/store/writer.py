"""The writer: the campaign's handle on its store, idempotent inserts and updates in transactions, and publishing.

Every write is ``INSERT OR IGNORE`` (or an anti-join on the primary key for large batches), so a re-run or a
resumed stage never duplicates rows. The process shares one read-write connection per file, held during a burst
of work and released when idle; after every committed stage the writer publishes a snapshot for readers.
A file that is not a mel store, or that does not read whole, is refused before anything is written to it.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from mel_core.atomic_files import copy_file_atomically
from mel_core.store.database import StoreError, connect_writer, open_error, rows_of, snapshot_path, verify_store
from mel_core.store.schema import PRIMARY_KEYS, SCHEMA_VERSION, STORE_FORMAT, TABLES, VIEWS

# A batch at least this fraction of its table's size skips existing keys with one anti-join (a scan of
# the key column, ~0.05 us/row) instead of INSERT OR IGNORE (~60 us per inserted row); see
# docs/BENCHMARKS.md, "store.py".
_ANTI_JOIN_MIN_FRACTION = 1e-3
_ARROW_KEY_TYPES = {"VARCHAR": (pa.types.is_string, pa.types.is_large_string),
                    "INTEGER": (pa.types.is_integer,), "BIGINT": (pa.types.is_integer,)}


def _unregister(con: duckdb.DuckDBPyConnection) -> None:
    """Drop the temporary view; after a failed statement this fails too ("transaction is aborted"), and
    must not replace the statement's own error."""
    with contextlib.suppress(duckdb.Error):
        con.unregister("_mel_rows")


class Writer:
    """Writes inside one transaction; obtained from :meth:`Store.transaction`."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    def insert(self, table: str, rows: Sequence[dict]) -> None:
        """Insert rows (dicts; columns by name, missing ones NULL); rows whose primary key exists are skipped."""
        if not rows:
            return
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}")
        self.insert_arrow(table, pa.Table.from_pylist(list(rows)))

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        """:meth:`insert` for data already in Arrow form (skips the dict -> Arrow conversion)."""
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}")
        if data.num_rows == 0:
            return
        self.con.register("_mel_rows", data)
        try:
            if self._anti_join_ok(table, data):
                # Same result as INSERT OR IGNORE when the batch's keys are distinct, 3x faster on large batches.
                using = ", ".join(PRIMARY_KEYS[table])
                self.con.execute(f"INSERT INTO {table} BY NAME SELECT r.* FROM _mel_rows r "
                                 f"ANTI JOIN {table} USING ({using})")
            else:
                self.con.execute(f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM _mel_rows")
        finally:
            _unregister(self.con)

    def _anti_join_ok(self, table: str, data: pa.Table) -> bool:
        key = PRIMARY_KEYS[table]
        if not key or any(c not in data.column_names or not any(
                f(data.schema.field(c).type) for f in _ARROW_KEY_TYPES.get(t, ())) for c, t in key.items()):
            return False
        distinct = (pc.count_distinct(data[next(iter(key))], mode="all").as_py() if len(key) == 1
                    else data.group_by(list(key)).aggregate([]).num_rows)
        if distinct != data.num_rows:
            return False  # duplicates inside the batch: OR IGNORE keeps the first, a plain INSERT would fail
        size = self.con.execute("SELECT estimated_size FROM duckdb_tables() WHERE table_name = ? AND "
                                "database_name = current_database() AND schema_name = current_schema()",
                                [table]).fetchall()
        return not size or data.num_rows >= _ANTI_JOIN_MIN_FRACTION * size[0][0]

    def update(self, table: str, key: str, rows: Sequence[dict]) -> None:
        """Set the given columns of existing rows, matched on `key` (idempotent). Rows may set different
        columns: each row sets only its own (one UPDATE per set of columns)."""
        by_columns: dict[tuple[str, ...], list[dict]] = {}
        for row in rows:
            by_columns.setdefault(tuple(c for c in row if c != key), []).append(row)
        for cols, group in by_columns.items():
            self.con.register("_mel_rows", pa.Table.from_pylist(group))
            try:
                sets = ", ".join(f"{c} = r.{c}" for c in cols)
                self.con.execute(f"UPDATE {table} SET {sets} FROM _mel_rows r WHERE {table}.{key} = r.{key}")
            finally:
                _unregister(self.con)

    def execute(self, sql: str, params: Sequence | None = None) -> None:
        self.con.execute(sql, params or [])


def _add_missing_columns(w: Writer, table: str, ddl: str) -> None:
    """Columns added to a table's schema since an existing file was created (as NULL in old rows)."""
    have = {r[0] for r in w.con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND "
                                        "database_name = current_database()", [table]).fetchall()}
    for line in ddl.strip().splitlines():
        name, sql_type = line.strip().rstrip(",").split()[:2]
        if name != "PRIMARY" and name not in have:
            w.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")


class _SharedConnection:
    """The process's read-write connection to one file: opened on demand, closed after `idle_s` unused.

    Opening a DuckDB file costs ~30 ms here (a new database instance, even for an empty file), and a
    stage's bookkeeping is a burst of reads and writes: sharing one connection across the burst makes
    it one open instead of four or five. Closing it when idle gives the lock back between bursts, so
    a reader in another process gets in while the campaign generates or trains.
    """

    def __init__(self, path: Path, idle_s: float):
        self.path, self.idle_s = path, idle_s
        self.lock = threading.RLock()  # DuckDB connections are not for concurrent use: one user at a time
        self.con: duckdb.DuckDBPyConnection | None = None
        self.uses = 0

    @contextlib.contextmanager
    def use(self, wait_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.lock:
            if self.con is None:
                self.con = connect_writer(self.path, read_only=False, wait_s=wait_s)
            self.uses += 1
            try:
                yield self.con
            finally:
                timer = threading.Timer(self.idle_s, self._close_if_unused_since, args=(self.uses,))
                timer.daemon = True
                timer.start()

    def _close_if_unused_since(self, use: int) -> None:
        with self.lock:
            if self.uses == use and self.con is not None:
                self.con.close()
                self.con = None

    def close(self) -> None:
        with self.lock:
            if self.con is not None:
                self.con.close()
                self.con = None


_SHARED: dict[Path, _SharedConnection] = {}
_SHARED_LOCK = threading.Lock()


def _shared(path: Path, idle_s: float) -> _SharedConnection:
    key = path.resolve()
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = _SharedConnection(key, idle_s)
        return _SHARED[key]


def release_connections() -> None:
    """Close this process's shared connections now (also at exit: the idle timer may not have fired)."""
    with _SHARED_LOCK:
        shared = list(_SHARED.values())
    for s in shared:
        s.close()


atexit.register(release_connections)


_VERIFIED: set[Path] = set()  # files this process checked (mel store, readable whole) before writing to them
_VERIFIED_LOCK = threading.Lock()


class Store:
    """The writer's handle on one DuckDB file (cheap to construct after the first time per process).

    Reads and writes go through the process's shared connection to the file (:class:`_SharedConnection`),
    held during bursts and released when idle, so another writer process (``mel eval`` adding evaluations)
    can get in between. An existing file is first checked to be a mel store that reads whole; a new one is
    created with the schema, and older ones gain the columns and views added since. Other processes read
    the published snapshot (:meth:`publish`, :class:`StoreReader`).
    """

    IDLE_RELEASE_S = 0.1

    def __init__(self, path: str | Path, lock_wait_s: float = 60.0):
        self.path = Path(path)
        self.lock_wait_s = lock_wait_s
        if self.path.exists():
            self._verify_existing()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.transaction() as w:
                for name, cols in TABLES.items():
                    w.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
                    _add_missing_columns(w, name, cols)
                for name, sql in VIEWS.items():
                    w.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
                w.insert("meta", [{"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                  {"key": "format", "value": STORE_FORMAT},
                                  {"key": "epoch", "value": uuid.uuid4().hex}])
        except duckdb.IOException as e:
            raise open_error(self.path, e) from e
        if not snapshot_path(self.path).exists():
            self.publish()

    def _verify_existing(self) -> None:
        """ForeignStore / CorruptStore before anything is written (once per process and file): checked on a
        read-only connection, since opening a file for writing is already a way of changing it."""
        key = self.path.resolve()
        with _VERIFIED_LOCK:
            if key in _VERIFIED:
                return
            if _shared(self.path, self.IDLE_RELEASE_S).con is None:
                verify_store(self.path, self.lock_wait_s)
            _VERIFIED.add(key)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with _shared(self.path, self.IDLE_RELEASE_S).use(self.lock_wait_s) as con:
            yield con

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Writer]:
        """All writes inside commit together or not at all."""
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield Writer(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def publish(self) -> Path:
        """Publish the committed state for readers: CHECKPOINT, copy the file, rename the copy over the
        snapshot. Holding the connection keeps every other writer out while the bytes are copied; a reader
        that has the previous snapshot open keeps reading it (a rename replaces the name, not the file)."""
        snap = snapshot_path(self.path)
        with self._connection() as con:
            con.execute("CHECKPOINT")
            copy_file_atomically(self.path, snap)
        return snap

    def insert(self, table: str, rows: Sequence[dict]) -> None:
        with self.transaction() as w:
            w.insert(table, rows)

    def update(self, table: str, key: str, rows: Sequence[dict]) -> None:
        with self.transaction() as w:
            w.update(table, key, rows)

    def execute(self, sql: str, params: Sequence | None = None) -> None:
        with self.transaction() as w:
            w.execute(sql, params)

    @property
    def epoch(self) -> str:
        """A random id written when the file was created: deleting the file invalidates caches."""
        return self.query("SELECT value FROM meta WHERE key = 'epoch'")[0]["value"]

    def query(self, sql: str, params: Sequence | None = None) -> list[dict]:
        """Rows as dicts (the writer's own reads: the live file, not the snapshot)."""
        with self._connection() as con:
            return rows_of(con.execute(sql, params or []))

    def counts(self) -> dict[str, int]:
        return {t: self.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}

