"""A standalone Prefect server and a process worker for campaigns (`mel serve`), and deploying to it.

Everything runs through the `prefect` command line of this environment, as subprocesses. State lives under PREFECT_HOME (the repo's `.prefect` when started by `mel`
or `make`), telemetry off.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POOL = "mel-process"  # the work pool of prefect.yaml's campaign deployment
DEPLOYMENT = "campaign"  # its name in prefect.yaml
DEFAULT_PORT = 4200


class ServeError(RuntimeError):
    pass


def prefect_cli() -> str:
    """The `prefect` executable next to this interpreter (the project's venv)."""
    return str(Path(sys.executable).with_name("prefect"))


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200 and json.loads(r.read() or b"false") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, timeout_s: float, server: subprocess.Popen | None = None) -> None:
    """Until the API answers; a server that exits first or a timeout is an error."""
    deadline = time.monotonic() + timeout_s
    while not healthy(url):
        if server is not None and server.poll() is not None:
            raise ServeError(f"the Prefect server exited with code {server.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise ServeError(f"no healthy Prefect server at {url} after {timeout_s:.0f}s")
        time.sleep(0.25)


def start_server(host: str, port: int, env: dict, **popen) -> subprocess.Popen:
    """`prefect server start` in the foreground of a child process (its own process group). The UI is told
    where its API is: Prefect 3.8.8 builds the UI's API URL from its settings, not from --port, so on any port
    but 4200 the UI would call 127.0.0.1:4200 and show no runs (PREFECT_UI_API_URL set by the caller wins)."""
    env = {"PREFECT_UI_API_URL": api_url(host, port), **env}
    return subprocess.Popen([prefect_cli(), "server", "start", "--host", host, "--port", str(port),
                             "--analytics-off"], env=env, start_new_session=True, **popen)


def ensure_pool(url: str, env: dict, limit: int | None = None) -> None:
    """The process work pool, created if missing; `limit` caps its concurrent flow runs (None: no cap)."""
    env = dict(env, PREFECT_API_URL=url)
    run = lambda *args: subprocess.run([prefect_cli(), *args], env=env, capture_output=True, text=True)
    if run("work-pool", "inspect", POOL).returncode != 0:
        made = run("work-pool", "create", POOL, "--type", "process")
        if made.returncode != 0:
            raise ServeError(f"cannot create work pool {POOL}: {made.stdout}{made.stderr}")
    if limit is not None:
        set_limit = run("work-pool", "set-concurrency-limit", POOL, str(limit))
        if set_limit.returncode != 0:
            raise ServeError(f"cannot set the concurrency limit of {POOL}: {set_limit.stdout}{set_limit.stderr}")


def start_worker(url: str, env: dict, **popen) -> subprocess.Popen:
    """A process worker for the pool: it runs each flow run as a child process of its own."""
    # The worker's flow runs start in the checkout (prefect.yaml's pull step); their runs are written under the
    # directory `mel serve` was started in (flows/deploy.py, MEL_WORK_DIR), never into the checkout.
    env = {"MEL_WORK_DIR": os.getcwd(), **env}
    return subprocess.Popen([prefect_cli(), "worker", "start", "--pool", POOL, "--type", "process"],
                            env=dict(env, PREFECT_API_URL=url), start_new_session=True, **popen)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the child's process group, SIGKILL it if it has not exited after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def serve(host: str, port: int, limit: int | None, env: dict, startup_timeout_s: float = 180.0) -> int:
    """Server + worker until interrupted (or until either exits); returns the exit code."""
    url = api_url(host, port)
    if healthy(url):
        raise ServeError(f"something already answers at {url}; pick another --port")
    server = start_server(host, port, env)
    worker = None
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        wait_healthy(url, startup_timeout_s, server)
        ensure_pool(url, env, limit)
        worker = start_worker(url, env)
        print(f"mel: Prefect server at {url} (UI http://{host}:{port}), worker on pool '{POOL}', "
              f"state in {env.get('PREFECT_HOME')}\n"
              f"mel: deploy and run a campaign with\n"
              f"  PREFECT_API_URL={url} mel deploy --run run.steps=2\n"
              f"mel: ready (Ctrl-C stops the worker and the server)", flush=True)
        while not stopping:
            for name, proc in (("server", server), ("worker", worker)):
                if proc.poll() is not None:
                    print(f"mel: the Prefect {name} exited with code {proc.returncode}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        for proc in (worker, server):
            if proc is not None:
                stop(proc)


def deploy(url: str, env: dict) -> None:
    """Create/update prefect.yaml's campaign deployment on the server at `url`."""
    out = subprocess.run([prefect_cli(), "--no-prompt", "deploy", "--name", DEPLOYMENT], cwd=REPO,
                         env=dict(env, PREFECT_API_URL=url, MEL_REPO_DIR=str(REPO)), capture_output=True, text=True)
    if out.returncode != 0:
        raise ServeError(f"prefect deploy failed:\n{out.stdout}{out.stderr}")
