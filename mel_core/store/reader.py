"""The reader: a handle on a store's published snapshot that cannot write, attach, install or block the writer,
the check that a user's SQL is one SELECT-like statement (the second layer of that guarantee), and the limits a
reader runs under (memory, threads, time: :class:`ReaderLimits`). This module owns those settings: a reader opened
with limits, or inside :func:`bounded_readers` (what every reader command of the CLI runs in), runs each of its
statements under them, and a Ctrl-C that stops a statement is a KeyboardInterrupt (DuckDB's is a RuntimeError).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pyarrow as pa

from mel_core.store.database import (
    MissingStore,
    QueryLimit,
    ReadOnlyViolation,
    checked_reader_connection,
    rows_of,
    snapshot_path,
)
from mel_core.store.schema import TABLES

try:
    import resource
except ImportError:  # not a Unix
    resource = None

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size as DuckDB writes them: '1GB' (10^9), '512MiB' (2^20), '2.5GB', '1000000' (bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size (e.g. 1GB, 512MB, 4GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


@dataclass(frozen=True)
class ReaderLimits:
    """What a user's query may use (`mel query`'s defaults; each raisable by its flag).

    memory: bytes. DuckDB's memory_limit covers only its buffer manager (DuckDB's "Limits" page): a string a
    function builds (repeat('x', 2e9)) or the rows handed to Python are allocated outside it. So the query also
    runs under a soft RLIMIT_AS of the process's address space at its start plus `memory` plus room for thread
    stacks (:data:`_ADDRESS_SLACK`): an allocation past it fails inside DuckDB as its own Out of Memory Error (or
    a MemoryError in Python), not as the machine's OOM killer. Restored when the query ends.
    threads: DuckDB's threads (a reader must not take every core of a machine the campaign trains on).
    seconds: wall time, after which the query is interrupted (con.interrupt()); 0 for none.
    """
    memory: int = 10**9
    threads: int = 1
    seconds: float = 60.0

    @property
    def statements(self) -> tuple[str, ...]:
        """The settings, run before the reader's configuration is locked."""
        return (f"SET memory_limit = '{self.memory}B'", f"SET threads = {self.threads}")


_BOUNDED: list[ReaderLimits] = []  # the limits of bounded_readers blocks, innermost last


@contextlib.contextmanager
def bounded_readers(limits: ReaderLimits) -> Iterator[None]:
    """Every reader opened inside the block without limits of its own gets `limits`: what a reader command (`mel
    query`, `export`, `report`, `lineage`, `runs`, `verify`) runs in, so the readers it opens deep inside (the
    export's, the report's, the listing's) are bounded as `mel query`'s is, by the same flags."""
    _BOUNDED.append(limits)
    try:
        yield
    finally:
        _BOUNDED.remove(limits)


_ADDRESS_SLACK = 256 << 20  # thread stacks, malloc arenas of a thread or two: not the query's data


def _address_space() -> int:
    """The process's virtual size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _address_space_cap(extra: int) -> Iterator[None]:
    """The process's address space capped (soft RLIMIT_AS) at its size now plus `extra` bytes, then given back.
    Where there is no RLIMIT_AS or /proc (not Linux), nothing is capped: DuckDB's memory_limit alone."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _address_space() + extra
    except (AttributeError, OSError, ValueError):
        yield
        return
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:  # a tighter cap is already in place: keep it
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class StoreReader:
    """A reader's handle: the store's published snapshot (or, for a file that has none, the file itself),
    opened read-only with READER_SETTINGS. It never creates, migrates or locks anything a writer needs.

    `path` is the store (``RUN/mel.duckdb``) or its run directory. Use as a context manager, or close().
    """

    def __init__(self, path: str | Path, lock_wait_s: float = 10.0, limits: ReaderLimits | None = None):
        p = Path(path)
        self.path = p / "mel.duckdb" if p.is_dir() else p
        if not self.path.is_file():
            raise MissingStore(f"no store at {self.path}")
        snap = snapshot_path(self.path)
        self.source = snap if snap.is_file() else self.path  # stores written before snapshots existed
        self.limits = limits if limits is not None else (_BOUNDED[-1] if _BOUNDED else None)
        self.con = checked_reader_connection(self.source, lock_wait_s, scan=False,
                                             limits=self.limits.statements if self.limits else ())

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def query(self, sql: str, params: Sequence | None = None) -> list[dict]:
        """Rows as dicts, under the reader's limits. The connection refuses writes and file access whatever `sql`
        is."""
        with self._bounded():
            return rows_of(self.con.execute(sql, params or []))

    def query_user(self, sql: str) -> tuple[list[str], list[tuple]]:
        """A user's SQL: one SELECT-like statement (:func:`check_read_only`), then the locked connection, under the
        reader's limits (QueryLimit when it reaches one)."""
        check_read_only(sql)
        with self._bounded():
            cur = self.con.execute(sql)
            cols = [d[0] for d in cur.description] if cur.description else []
            return cols, cur.fetchall()

    def query_user_arrow(self, sql: str) -> pa.Table:
        """:meth:`query_user` as an Arrow table: the column types DuckDB has (lists, timestamps, decimals), for
        a file the caller writes (this connection cannot write one)."""
        check_read_only(sql)
        with self._bounded():
            return self.con.sql(sql).to_arrow_table()

    @contextlib.contextmanager
    def _bounded(self, cap_memory: bool = True) -> Iterator[None]:
        """Run a statement (and the fetch of its rows) under :attr:`limits`: a timer that interrupts it, the address
        space cap; either one reached is a QueryLimit saying which and how to raise it. A Ctrl-C that stops it is a
        KeyboardInterrupt (the CLI's exit 130), limits or not."""
        limits = self.limits
        timed_out = threading.Event()
        timer = None
        if limits is not None and limits.seconds > 0:
            timer = threading.Timer(limits.seconds, lambda: (timed_out.set(), self.con.interrupt()))
            timer.daemon = True
            timer.start()
        cap = _address_space_cap(limits.memory + _ADDRESS_SLACK) if limits is not None and cap_memory \
            else contextlib.nullcontext()
        try:
            with cap:
                yield
        except (duckdb.InterruptException, RuntimeError) as e:
            if not _interrupted(e):
                raise
            if not timed_out.is_set():  # DuckDB stops a statement on Ctrl-C itself: the user's stop, not a failure
                raise KeyboardInterrupt from None
            raise QueryLimit(f"query stopped at the reader's time limit of {limits.seconds:g} s (--time-limit "
                             f"SECONDS to raise it, 0 for none)") from None
        except (duckdb.OutOfMemoryException, MemoryError) as e:
            if limits is None:
                raise
            said = (str(e).splitlines() or [""])[0]
            raise QueryLimit(f"query stopped at the reader's memory limit of {_size(limits.memory)} (--memory-limit "
                             f"SIZE to raise it){': ' + said if said else ''}") from None
        finally:
            if timer is not None:
                timer.cancel()

    def query_batches(self, sql: str, params: Sequence | None = None,
                      batch_rows: int = 65536) -> pa.RecordBatchReader:
        """Rows as a stream of Arrow record batches: an export of a long campaign never holds it all in memory. The
        reader's time limit runs from this call to the stream's end; its memory is DuckDB's memory_limit (the stream
        is read by the caller's code, outside any address-space cap)."""
        def schema_then_batches():
            with self._bounded(cap_memory=False):  # the statement may run whole before its first batch
                stream = self.con.sql(sql, params=list(params or [])).to_arrow_reader(batch_rows)
                yield stream.schema
                yield from stream

        batches = schema_then_batches()
        return pa.RecordBatchReader.from_batches(next(batches), batches)

    def counts(self) -> dict[str, int]:
        return {t: self.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


def _interrupted(e: BaseException) -> bool:
    """A statement stopped by con.interrupt() (the time limit's timer) or by DuckDB's own Ctrl-C handling, which
    raises RuntimeError('Query interrupted') while rows are fetched."""
    return isinstance(e, duckdb.InterruptException) or (type(e) is RuntimeError and "interrupted" in str(e).lower())


def _size(n: int) -> str:
    """Bytes as the flag would write them: 1GB, 512MB, 1.5GB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n}B"


def open_reader(path: str | Path, lock_wait_s: float = 10.0, limits: ReaderLimits | None = None) -> StoreReader:
    """The Python read API: ``with open_reader("runs/tiny-demo") as r: r.query("SELECT ...")``; with `limits`,
    :meth:`StoreReader.query_user` runs under them as `mel query` does."""
    return StoreReader(path, lock_wait_s, limits)


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
