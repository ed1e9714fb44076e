"""The reader: a handle on a store's published snapshot that cannot write, attach, install or block the writer,
and the check that a user's SQL is one SELECT-like statement (the second layer of that guarantee).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import duckdb
import pyarrow as pa

from mel_core.store.database import MissingStore, ReadOnlyViolation, checked_reader_connection, rows_of, snapshot_path
from mel_core.store.schema import TABLES


class StoreReader:
    """A reader's handle: the store's published snapshot (or, for a file that has none, the file itself),
    opened read-only with READER_SETTINGS. It never creates, migrates or locks anything a writer needs.

    `path` is the store (``RUN/mel.duckdb``) or its run directory. Use as a context manager, or close().
    """

    def __init__(self, path: str | Path, lock_wait_s: float = 10.0):
        p = Path(path)
        self.path = p / "mel.duckdb" if p.is_dir() else p
        if not self.path.is_file():
            raise MissingStore(f"no store at {self.path}")
        snap = snapshot_path(self.path)
        self.source = snap if snap.is_file() else self.path  # stores written before snapshots existed
        self.con = checked_reader_connection(self.source, lock_wait_s, scan=False)

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def query(self, sql: str, params: Sequence | None = None) -> list[dict]:
        """Rows as dicts. The connection refuses writes and file access whatever `sql` is."""
        return rows_of(self.con.execute(sql, params or []))

    def query_user(self, sql: str) -> tuple[list[str], list[tuple]]:
        """A user's SQL: one SELECT-like statement (:func:`check_read_only`), then the locked connection."""
        check_read_only(sql)
        cur = self.con.execute(sql)
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()

    def query_user_arrow(self, sql: str) -> pa.Table:
        """:meth:`query_user` as an Arrow table: the column types DuckDB has (lists, timestamps, decimals), for
        a file the caller writes (this connection cannot write one)."""
        check_read_only(sql)
        return self.con.sql(sql).to_arrow_table()

    def query_batches(self, sql: str, params: Sequence | None = None,
                      batch_rows: int = 65536) -> pa.RecordBatchReader:
        """Rows as a stream of Arrow record batches: an export of a long campaign never holds it all in memory."""
        return self.con.sql(sql, params=list(params or [])).to_arrow_reader(batch_rows)

    def counts(self) -> dict[str, int]:
        return {t: self.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


def open_reader(path: str | Path, lock_wait_s: float = 10.0) -> StoreReader:
    """The Python read API: ``with open_reader("runs/tiny-demo") as r: r.query("SELECT ...")``."""
    return StoreReader(path, lock_wait_s)


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?", re.IGNORECASE)
_READ_ONLY_HELP = "a reader runs one SELECT (or DESCRIBE, SHOW, SUMMARIZE, or EXPLAIN of one)"


def check_read_only(sql: str) -> None:
    """The second layer of a reader's guarantee: exactly one statement, and a SELECT-like one (EXPLAIN
    [ANALYZE] only of a SELECT: EXPLAIN ANALYZE runs what it explains). The first layer is the connection."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ReadOnlyViolation(f"query refused: DuckDB cannot parse it ({str(e).splitlines()[0]})") from e
    if not statements:
        raise ReadOnlyViolation(f"empty query: {_READ_ONLY_HELP}")
    if len(statements) > 1:
        raise ReadOnlyViolation(f"{len(statements)} statements refused: {_READ_ONLY_HELP}")
    kind = str(statements[0].type).split(".")[-1]
    if kind == "EXPLAIN":
        inner = duckdb.extract_statements(_EXPLAIN.sub("", statements[0].query, count=1))
        inner_kind = str(inner[0].type).split(".")[-1] if len(inner) == 1 else "MULTI"
        if inner_kind != "SELECT":
            raise ReadOnlyViolation(f"EXPLAIN of {_verb(inner[0].query) if len(inner) == 1 else 'several statements'}"
                                    f" refused: {_READ_ONLY_HELP}")
    elif kind != "SELECT":
        raise ReadOnlyViolation(f"{_verb(statements[0].query)} statement refused: {_READ_ONLY_HELP}")


def _verb(statement: str) -> str:
    """The statement's own first word (INSTALL, RESET, CHECKPOINT): DuckDB's types lump them (LOAD, SET, CALL)."""
    words = statement.split()
    return words[0].upper() if words else "empty"
