"""Clean stops (mel_app.interrupts): Ctrl-C in a terminal (SIGINT to the whole process group) or SIGTERM to the
campaign's pid, while step 2's update runs, stops `mel run` within seconds; the stage is recorded `interrupted`
with its step, the run lock is released, the temporary Prefect server the campaign started is gone, and one line
says how to resume; the same command then resumes and finishes. A second signal exits at once.

The campaign runs in a session of its own (a terminal's foreground process group, as the shell starts it) with a
scripted engine on a micro model (tests/scripted_campaign.py). An injected fault of kind `hang` holds step 2's
update until a signal arrives, so the signal lands mid-stage at a moment the test chooses.

The bound, STOP_WITHIN = 15 s from the signal to the exit: the stop itself measures ~5 s on a loaded 2-core machine
(the stage records its interruption, Prefect's engine reports its task and flow runs Crashed to the server, its
services drain — at most 5 s — and the server stops — at most 5 s before it is killed); the rest is slack for load.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from mel_core.run import lock
from mel_core.run.listing import list_runs
from mel_core.store.reader import StoreReader

pytestmark = pytest.mark.slow

STOP_WITHIN = 15.0
HANG = "orchestration.faults=[{stage: update, step: 2, when: before, kind: hang}]"


def _cmd(root, model, *more):
    return [sys.executable, "-m", "tests.scripted_campaign", "run", "--config", "configs/tiny.yaml", "run.name=sig",
            "run.steps=2", f"run.root_dir={root}", f"model.name_or_path={model}", "sampling.prompts_per_step=4",
            "sampling.group_size=4", *more]


def _env():
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the campaign starts its temporary server
    return env


def _alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _session(sid):
    """Live processes of session `sid` (the campaign's, which it leads)."""
    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                out.append(pid)
        except OSError:
            pass
    return _alive(out)


def _stop_mid_update(root, model, tmp_path, send):
    """Start the campaign, wait for step 2's update to run, `send(proc)`; returns (proc, seconds to exit, stdout,
    stderr, the server's pid)."""
    out, err = open(tmp_path / "out", "w+"), open(tmp_path / "err", "w+")
    proc = subprocess.Popen(_cmd(root, model, HANG), stdout=out, stderr=err, start_new_session=True, env=_env())
    db = root / "sig" / "mel.duckdb"
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, open(tmp_path / "err").read()[-2000:]
            assert time.time() < deadline, "step 2's update never started"
            if db.exists():
                try:
                    with StoreReader(db) as r:
                        if r.query("SELECT 1 FROM stage_runs WHERE status = 'running' AND stage = 'update' "
                                   "AND step = 2"):
                            break
                except Exception:  # the first snapshot is being written
                    pass
            time.sleep(0.3)
        servers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                   if "uvicorn" in " ".join(p.cmdline())]
        assert len(servers) == 1  # the temporary Prefect server, started by the campaign
        t0 = time.monotonic()
        send(proc)
        proc.wait(timeout=120)
        took = time.monotonic() - t0
        time.sleep(0.5)
        return proc, took, open(tmp_path / "out").read(), open(tmp_path / "err").read(), servers[0]
    finally:
        if proc.poll() is None:  # only what this test started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)


def _check_stopped(root, proc, took, err, server, name, code):
    assert proc.returncode == code, err[-3000:]
    assert took < STOP_WITHIN, f"{took:.1f}s"
    assert _alive([server]) == [] and _session(proc.pid) == []  # the server and every process of the session
    resume = [line for line in err.splitlines() if line.startswith(f"mel: interrupted by {name}")]
    assert len(resume) == 1 and "in step 2 (update)" in resume[0] and "mel run --config configs/tiny.yaml" in \
        resume[0], err
    with StoreReader(root / "sig" / "mel.duckdb") as r:
        last = r.query("SELECT step, stage, status, error FROM stage_runs ORDER BY started_at DESC LIMIT 1")
    assert last == [{"step": 2, "stage": "update", "status": "interrupted", "error": f"stopped by {name}"}]
    (run,), _ = list_runs(root)
    assert (run.status, run.steps) == ("interrupted", "1/2")
    assert lock.holder(root / "sig") is None
    assert json.loads((root / "sig" / lock.LOCK_FILE).read_text())["released"] is True  # released, not taken over


def test_ctrl_c_to_the_process_group_stops_cleanly_and_the_run_resumes(tmp_path, micro_model):
    root = tmp_path / "runs"
    proc, took, _, err, server = _stop_mid_update(root, micro_model, tmp_path,
                                                  lambda p: os.killpg(p.pid, signal.SIGINT))
    _check_stopped(root, proc, took, err, server, "SIGINT", 130)

    resumed = subprocess.run(_cmd(root, micro_model), capture_output=True, text=True, start_new_session=True,
                             timeout=900, env=_env())
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "took over the lock" not in resumed.stdout
    (run,), _ = list_runs(root)
    assert (run.status, run.steps) == ("finished", "2/2")
    with StoreReader(root / "sig" / "mel.duckdb") as r:
        done = r.query("SELECT stage, step, count(*) AS n FROM stage_runs WHERE status = 'completed' GROUP BY ALL")
    assert all(d["n"] == 1 for d in done), done  # step 1 and step 2's earlier stages were reused, not run again


def test_sigterm_to_the_pid_stops_cleanly(tmp_path, micro_model):
    root = tmp_path / "runs"
    proc, took, _, err, server = _stop_mid_update(root, micro_model, tmp_path,
                                                  lambda p: os.kill(p.pid, signal.SIGTERM))
    _check_stopped(root, proc, took, err, server, "SIGTERM", 143)


def test_a_second_ctrl_c_exits_at_once(tmp_path, micro_model):
    """Two Ctrl-C in a row: the second exits without waiting for the cleanup; the server dies with its parent
    (PR_SET_PDEATHSIG) and the kernel releases the lock."""
    root = tmp_path / "runs"

    def twice(p):
        os.killpg(p.pid, signal.SIGINT)
        time.sleep(0.2)  # the first is being handled (its stop takes ~1 s): not coalesced with it
        os.killpg(p.pid, signal.SIGINT)

    proc, took, _, err, server = _stop_mid_update(root, micro_model, tmp_path, twice)
    # The second lands while the first is handled and exits at once — or, on a machine where the first stop was
    # faster than 0.2 s, after it finished: then the first stop's own line must be there (and the exit as fast).
    assert proc.returncode == 130, err[-3000:]
    assert "mel: SIGINT again: exiting now" in err or "the run is recorded interrupted" in err, err[-3000:]
    assert took < STOP_WITHIN, f"{took:.1f}s"
    deadline = time.time() + 10
    while _alive([server]) and time.time() < deadline:
        time.sleep(0.2)
    assert _alive([server]) == [] and _session(proc.pid) == []
    assert lock.holder(root / "sig") is None
