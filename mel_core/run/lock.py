"""One campaign per run directory: an exclusive lock held for the campaign's whole life.

Two campaigns writing one run directory interleave their stages (the same step completed twice, one
marking the other's live stage interrupted, one deleting the other's checkpoint temp directory). So a
campaign takes ``RUN_DIR/run.lock`` with ``flock(LOCK_EX | LOCK_NB)`` before its first record and keeps it
until it ends; a second campaign is refused at once with the holder's pid, host, start time and command.

The kernel releases an ``flock`` when its process dies, however it dies, so a lock "left" by a dead process
is simply free; its file still names the dead holder, which is how the takeover is noticed and logged.
``flock`` is per host on most network filesystems: two hosts sharing a run directory are not protected
(the file still names the holder's host, for the operator to see).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from mel_core.errors import PermanentError

LOCK_FILE = "run.lock"


class RunLocked(PermanentError, RuntimeError):
    """Another live campaign holds the run directory."""


class RunDirError(PermanentError, OSError):
    """The run directory cannot be created or written."""


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')} "
            f"({holder.get('command', '?')})")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}


def ensure_writable(run_dir: Path) -> None:
    """RunDirError (one line, permanent) unless `run_dir` exists or can be made, and a file can be written in it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run directory {run_dir} cannot be written: {e.strerror or e}") from e


def holder(run_dir: Path) -> dict | None:
    """Who holds the run directory now (pid, host, started_at, command), or None if nobody does."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {"pid": "?", "host": "?", "started_at": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: Path, log: Callable[[str], None] = print, extra: dict | None = None,
             on_takeover: Callable[[dict, dict], None] | None = None) -> Iterator[dict]:
    """Hold `run_dir` exclusively for the block; RunLocked at once if a live process holds it.

    `extra` joins the holder's record (the campaign's Prefect flow run, for whoever comes next). When the
    previous holder ended without releasing the lock, `on_takeover(previous record, this record)` runs once the
    lock is ours (the campaign marks the dead process's flow runs Crashed)."""
    run_dir = Path(run_dir)
    ensure_writable(run_dir)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"run directory {run_dir} is in use by another campaign: {_describe(_read(fd))}; "
                            f"wait for it to end, or stop it, then run again (it resumes)") from None
        previous = _read(fd)
        died = bool(previous) and not previous.get("released")
        if died:
            log(f"mel: took over the lock of {run_dir} from a process that ended without releasing it: "
                f"{_describe(previous)}")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:300], **(extra or {})}
        _write(fd, me)
        if died and on_takeover is not None:
            on_takeover(previous, me)
        try:
            yield me
        finally:
            _write(fd, {**me, "released": True})
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
