"""Prefect servers of a test's own: a free port, a standalone server (as `mel serve` starts it), `mel serve`
itself, and waiting for a line in a log. Each has its own PREFECT_HOME and never the session's API URL."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mel_app import serve

MEL = [sys.executable, "-m", "mel_app.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_env(home: Path, **extra: str) -> dict:
    """The environment of a process with Prefect state under `home` and no inherited API URL."""
    env = dict(os.environ, PREFECT_HOME=str(home), **extra)
    env.pop("PREFECT_API_URL", None)
    return env


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until `text` is in the log at `path`; fails with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no '{text}' after {timeout_s}s:\n{path.read_text()[-3000:]}"
        time.sleep(0.5)


@contextlib.contextmanager
def standalone_server(home: Path):
    """A standalone Prefect server on a free port (its own session, log in `home`); yields (API URL, env)."""
    port = free_port()
    url, env = serve.api_url("127.0.0.1", port), own_env(home)
    proc = serve.start_server("127.0.0.1", port, env, stdout=(home / "server.log").open("w"),
                              stderr=subprocess.STDOUT)
    try:
        serve.wait_healthy(url, 240, proc)
        yield url, env
    finally:
        serve.stop(proc)


@contextlib.contextmanager
def mel_serve(home: Path, *args: str, **env_extra: str):
    """`mel serve` (server + process worker) on a free port until it says it is ready; yields (port, env, log)."""
    port = free_port()
    env, log = own_env(home, **env_extra), home / "serve.log"
    proc = subprocess.Popen([*MEL, "serve", "--port", str(port), *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(log, "mel: ready", proc, 240)
        yield port, env, log
    finally:
        serve.stop(proc)
