"""The worker pool: one item per worker with its own deadline (pebble), restarted when a worker dies."""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

from mel_core.algorithm.rewards.verdicts import error_reason
from mel_core.algorithm.rewards.worker import run_op, worker_init

# ------------------------------------------------------------------------------------------- parent side

# Workers are started by multiprocessing's "spawn": a fresh interpreter, never a fork of this (threaded) process.
# (forkserver would restart killed workers faster, but a caller script without an ``if __name__ == "__main__"``
# guard hangs it instead of failing; see docs/REWARDS.md.)
_START_METHOD = "spawn"
_BROKEN_POOL = "error: BrokenProcessPool"
# Where a worker that finds itself re-running the caller's unguarded script leaves word of it (path in the environment
# the workers inherit; one file per parent process).
_UNGUARDED_MARK_ENV = "MEL_VERIFY_UNGUARDED_MARK"


class UnguardedMainScript(SystemExit):
    """The caller's script verifies at import level, without an ``if __name__ == "__main__":`` guard: every spawned
    worker re-runs the script and, in it, tries to start workers of its own, so none can start. A SystemExit (one
    line, exit 1, no traceback) because the script as written cannot verify anything: every verdict would be an
    error."""


def _unguarded_mark() -> Path:
    return Path(tempfile.gettempdir()) / f"mel-verify-unguarded-{os.getpid()}"


def _in_worker_start_up() -> bool:
    """True in a spawned worker while it re-imports the parent's main script (multiprocessing's bootstrap)."""
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _refuse_unguarded_main() -> None:
    """In a worker re-running an unguarded script that reached the verifier: leave word for the parent and exit
    quietly (multiprocessing would raise its own 20-line RuntimeError here)."""
    mark = os.environ.get(_UNGUARDED_MARK_ENV)
    if mark:
        with contextlib.suppress(OSError):
            Path(mark).touch()
    raise SystemExit(1)


class _Pool:
    """Per-process worker pool on ``pebble.ProcessPool``; items run one per worker with their own deadline (see the
    docs/REWARDS.md). Calls from several threads take turns (one batch at a time)."""

    def __init__(self, max_workers: int, memory_mb: int):
        self.max_workers = max(1, max_workers)
        self.memory_mb = memory_mb
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.stats = {"pools_started": 0, "killed_timeout": 0, "crashed": 0}
        self._pebble = None  # the pebble.ProcessPool, started on first use

    def _running_pool(self):
        """The pebble pool, started on first use and restarted when pebble has given up on it (ERROR state, e.g.
        after a worker died while no item was running)."""
        import multiprocessing

        import pebble

        if _in_worker_start_up():
            _refuse_unguarded_main()
        if self._pebble is not None and not self._pebble.active:
            self._stop()
        if self._pebble is None:
            os.environ[_UNGUARDED_MARK_ENV] = str(_unguarded_mark())  # inherited by the workers spawned below
            self._pebble = pebble.ProcessPool(self.max_workers, initializer=worker_init, initargs=(self.memory_mb,),
                                              context=multiprocessing.get_context(_START_METHOD))
            self.stats["pools_started"] += 1
        return self._pebble

    def run(self, tasks: Sequence[tuple[str, tuple]], timeout_s: float | None) -> list[tuple[str, Any]]:
        """``(op, args)`` tasks -> ``("ok", result)`` / ``("err", reason)`` / ``("timeout", None)``, in order."""
        if not tasks:
            return []
        with self.lock:
            results = self._run_on_pool(tasks, timeout_s)
            # pebble aborts every task of a pool it declares broken, which it does when a worker dies while none of
            # the pool's items is running yet (e.g. killed while idle, just before this batch): those items get
            # one more try, on a new pool.
            broken = [i for i, r in enumerate(results) if r == ("err", _BROKEN_POOL)]
            if broken:
                self._check_main_guard()
                for i, r in zip(broken, self._run_on_pool([tasks[i] for i in broken], timeout_s)):
                    results[i] = r
            return results

    def _run_on_pool(self, tasks, timeout_s):
        pool = self._running_pool()
        futures = [pool.schedule(run_op, args=(op, args), timeout=timeout_s) for op, args in tasks]
        return [self._outcome(f) for f in futures]

    def _check_main_guard(self) -> None:
        """UnguardedMainScript when a worker reported that it re-ran an unguarded script (see _refuse_unguarded_main)."""
        mark = _unguarded_mark()
        if not mark.exists():
            return
        mark.unlink(missing_ok=True)
        self._stop()
        import __main__

        script = getattr(__main__, "__file__", None) or "the main script"
        raise UnguardedMainScript(f"mel: verification workers cannot start: each one re-runs {script} (multiprocessing "
                                  f"spawn), which verifies when it is imported; put the script's work under "
                                  f'`if __name__ == "__main__":`')

    def _outcome(self, future) -> tuple[str, Any]:
        import concurrent.futures

        import pebble

        try:
            return future.result()
        except concurrent.futures.TimeoutError:  # pebble killed the worker at the item's deadline
            self.stats["killed_timeout"] += 1
            return "timeout", None
        except pebble.ProcessExpired:  # the worker died mid-item (segfault, OOM kill, ...)
            self.stats["crashed"] += 1
            return "err", "error: WorkerCrashed"
        except Exception as e:  # the pool itself failed (e.g. BrokenProcessPool: no worker could start)
            return "err", error_reason(e)

    def worker_pids(self) -> list[int]:
        """The live workers' process ids (for tests and diagnostics)."""
        import multiprocessing

        return [p.pid for p in multiprocessing.active_children() if p.name == "pebble_pool_worker"]  # pebble's name

    def _stop(self) -> None:
        pool, self._pebble = self._pebble, None
        if pool is not None:
            pool.stop()
            pool.join()

    def shutdown(self) -> None:
        with self.lock:
            self._stop()


_POOL: _Pool | None = None
_POOL_GUARD = threading.Lock()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def shared_pool() -> _Pool:
    global _POOL
    with _POOL_GUARD:
        if _POOL is None or _POOL.pid != os.getpid():  # (a forked child must not share its parent's workers)
            _POOL = _Pool(_env_int("MEL_VERIFY_WORKERS", min(os.cpu_count() or 1, 8)),
                          _env_int("MEL_VERIFY_MEMORY_MB", 4096))
        return _POOL


def shutdown_pool() -> None:
    """Stop the verification workers of this process (a later call starts new ones)."""
    global _POOL
    with _POOL_GUARD:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown_pool)


def check_timeout(timeout_s: float | None) -> float | None:
    if timeout_s is None:
        return None
    t = float(timeout_s)
    if not t > 0:
        raise ValueError(f"timeout_s must be > 0 (or None for no limit), got {timeout_s!r}")
    return t


