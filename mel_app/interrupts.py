"""Clean stops for `mel run`: one Ctrl-C or one SIGTERM stops the campaign within seconds, a second exits at once.

- **The signals.** ``stop_on_signals`` makes SIGINT and SIGTERM raise :class:`mel_core.errors.Interrupted` (a
  KeyboardInterrupt) in the main thread, where the stages run. While a flow runs, Prefect's engine swaps in its own
  SIGTERM handler (prefect.utilities.engine.capture_sigterm): it raises TerminationSignal, which the stage records
  as an interruption too, marks its runs Crashed, then restores ours and sends the signal again, so ours raises
  Interrupted and the stop goes on as Ctrl-C's does. A second signal while the first is being handled exits at
  once (``os._exit``, 128 + the signal: 130 for SIGINT, 143 for SIGTERM) — the run lock is the kernel's (flock),
  so even that releases it, and the temporary server dies with its parent (below).
- **The temporary Prefect server.** With no PREFECT_API_URL, Prefect starts a temporary API server (uvicorn) in a
  subprocess of the campaign's process group, so a terminal's Ctrl-C killed it too, and the engine then hung
  reporting to a dead server. ``temporary_server`` starts that same server (Prefect's own SubprocessASGIServer
  singleton, which every Prefect client in the process then uses) in a session of its own, asks the kernel to
  SIGTERM it if the campaign dies (PR_SET_PDEATHSIG: a SIGKILLed campaign leaves no server behind either), and
  stops it when the campaign ends, however it ends, after Prefect's event and log services have drained.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import types
from typing import Iterator

from mel_core.errors import Interrupted

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted in the main thread; the second one exits the process at once."""
    seen: list[int] = []

    def on_signal(signum, frame):
        seen.append(signum)
        name = signal.Signals(signum).name
        if len(seen) > 1:
            os.write(2, f"mel: {name} again: exiting now\n".encode())
            os._exit(128 + signum)
        os.write(2, f"mel: {name}: stopping (a second Ctrl-C or SIGTERM exits at once) ...\n".encode())
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM when the campaign's thread that started it ends (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def temporary_server() -> Iterator[str | None]:
    """Prefect's temporary API server, started here in a session of its own and stopped at the end of the block;
    yields its API URL (None, and nothing started, when PREFECT_API_URL names a server or Prefect may not start
    one)."""
    from prefect.server.api import server as server_mod
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None
        return
    server = server_mod.SubprocessASGIServer()  # the singleton Prefect's clients use when no URL is set
    if not server.running:
        def popen(*args, **kwargs):
            return subprocess.Popen(*args, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)

        # Prefect's own command line and environment for the server; only how the process is started changes.
        server_mod.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})
        try:
            server.start()
        finally:
            server_mod.subprocess = subprocess
    try:
        yield server.api_url
    finally:
        _drain_prefect_services()
        server.stop()


def _drain_prefect_services(timeout: float = 5.0) -> None:
    """Prefect's background services (events, logs) send what they hold while the server still answers."""
    try:
        from prefect._internal.concurrency.services import _QueueServiceBase

        _QueueServiceBase.drain_all(timeout=timeout)
    except Exception:
        pass
