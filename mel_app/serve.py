"""A standalone Prefect server and a process worker for campaigns (`mel serve`), and deploying to it.

Everything runs through the `prefect` command line of this environment, as subprocesses. State lives under PREFECT_HOME (the repo's `.prefect` when started by `mel`
or `make`), telemetry off.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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


def check_port_free(host: str, port: int) -> None:
    """ServeError in one line unless this machine can listen on (host, port): a port another server holds (a second
    `mel serve` on it), or a host that is not an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host {host!r} is not an address of this machine ({e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServeError(f"port {port} on {host} is in use (another `mel serve`, or another server); "
                                 f"pick another --port") from None
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def hold_port(port: int):
    """An exclusive lock on this machine's `port` for `mel serve` (a file under the temp directory): a second `mel
    serve` on the port is refused at once, in one line. The check that the port is free cannot tell two servers
    started together apart: Prefect's server binds its port only after a startup of many seconds, and the API that
    then answers the second one would be the first's."""
    import fcntl
    import tempfile

    f = open(Path(tempfile.gettempdir()) / f"mel-serve-{port}.lock", "a+")  # noqa: SIM115 (held for the process)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ServeError(f"port {port} is in use by another `mel serve` (pid {holder}); pick another --port") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class _Output:
    """A child's output, held until the child is up (then printed, and passed through from then on), so a server
    that fails to start is reported in one line instead of its traceback."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.passing = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self.lock:
                if self.passing:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    self.lines.append(line)

    def pass_through(self) -> None:
        with self.lock:
            sys.stdout.write("".join(self.lines))
            sys.stdout.flush()
            self.lines, self.passing = [], True

    def says(self, text: str) -> bool:
        with self.lock:
            return any(text in line for line in self.lines)

    def why(self) -> str:
        """The child's last line that says what went wrong (an ERROR line, else its last line)."""
        self.thread.join(timeout=2)
        with self.lock:
            lines = [ln.strip() for ln in self.lines if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("Traceback")]
        return (errors or lines or ["no output"])[-1][:300]


def wait_healthy(url: str, timeout_s: float, server: subprocess.Popen | None = None,
                 output: _Output | None = None) -> None:
    """Until the API answers; a server that exits first or a timeout is an error. With the server's `output`, a
    server that could not bind its port is one (the API that answers would be another server's)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if output is not None and output.says("address already in use"):
            raise ServeError(f"the port of {url} is in use: another server took it while this one started; pick "
                             f"another --port")
        if server is not None and server.poll() is not None:
            why = f": {output.why()}" if output is not None else ""
            raise ServeError(f"the Prefect server exited with code {server.returncode} before {url} answered{why}")
        if healthy(url):
            return
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
    port_lock = hold_port(port)  # held until this process ends (the kernel releases it however it ends)
    if healthy(url):
        raise ServeError(f"something already answers at {url}; pick another --port")
    check_port_free(host, port)
    server = start_server(host, port, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Output(server.stdout)
    worker = None
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        wait_healthy(url, startup_timeout_s, server, output)
        output.pass_through()
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
        port_lock.close()


def deploy(url: str, env: dict) -> None:
    """Create/update prefect.yaml's campaign deployment on the server at `url`."""
    out = subprocess.run([prefect_cli(), "--no-prompt", "deploy", "--name", DEPLOYMENT], cwd=REPO,
                         env=dict(env, PREFECT_API_URL=url, MEL_REPO_DIR=str(REPO)), capture_output=True, text=True)
    if out.returncode != 0:
        raise ServeError(f"prefect deploy failed:\n{out.stdout}{out.stderr}")
