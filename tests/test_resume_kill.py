"""Crash safety: SIGKILL a campaign while `update` runs, start it again, and check the store.

The campaign runs in a subprocess (its own temporary Prefect server); the parent watches the DuckDB
file between the campaign's writes (the writer holds it only while writing).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from mel_core.store import Store

pytestmark = pytest.mark.slow

STEPS = 2


def _start(root, env):
    cmd = [sys.executable, "-m", "mel_core.cli", "run", "--config", "configs/tiny.yaml", "run.name=kill",
           f"run.steps={STEPS}", f"run.root_dir={root}", "sampling.prompts_per_step=8"]
    # Its own session: the kill takes the whole process group (the campaign and the temporary Prefect
    # server it started), as a pre-empted machine would; otherwise the server keeps the output pipe open.
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _running_update(db) -> int | None:
    try:
        rows = Store.open_existing(db, lock_wait_s=0.5).query(
            "SELECT step FROM stage_runs WHERE stage = 'update' AND status = 'running'")
    except Exception:  # the writer holds the lock, or the file is not there yet
        return None
    return rows[0]["step"] if rows else None


def test_sigkill_during_update_then_resume(tmp_path):
    env = dict(os.environ)
    root = tmp_path / "runs"
    db = root / "kill" / "mel.duckdb"
    proc = _start(root, env)
    killed_at = None
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        step = _running_update(db) if db.exists() else None
        if step is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0]
    assert killed_at is not None, f"never saw update running; campaign output:\n{out[-3000:]}"

    before = Store(db).query("SELECT stage, step FROM stage_runs WHERE status = 'completed'")
    proc = _start(root, env)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]

    s = Store(db)
    # no finished stage ran twice: every (step, stage) has exactly one completed execution
    runs = s.query("SELECT step, stage, count(*) AS n FROM stage_runs WHERE status = 'completed' GROUP BY ALL")
    assert all(r["n"] == 1 for r in runs), runs
    assert {(r["stage"], r["step"]) for r in before} <= {(r["stage"], r["step"]) for r in runs}
    # the killed update is the only stage that executed again; the resumed campaign marked its first try
    again = s.query("SELECT stage, step FROM stage_runs WHERE status != 'completed'")
    assert again == [{"stage": "update", "step": killed_at}]
    assert s.query("SELECT status FROM stage_runs WHERE status != 'completed'") == [{"status": "interrupted"}]
    # no duplicate or orphan rows
    assert s.query("SELECT count(*) AS n FROM updates")[0]["n"] == STEPS
    assert s.query("SELECT count(*) AS n FROM checkpoints")[0]["n"] == STEPS + 1
    orphans = s.query(
        "SELECT (SELECT count(*) FROM rollouts r LEFT JOIN prompts p USING (prompt_id) WHERE p.prompt_id IS NULL) "
        "+ (SELECT count(*) FROM pairs pa LEFT JOIN rollouts r ON r.rollout_id = pa.correct_rollout_id "
        "   WHERE r.rollout_id IS NULL) "
        "+ (SELECT count(*) FROM analyses a LEFT JOIN pairs pa USING (pair_id) WHERE pa.pair_id IS NULL) "
        "+ (SELECT count(*) FROM heuristics h LEFT JOIN analyses a USING (analysis_id) WHERE a.analysis_id IS NULL) "
        "+ (SELECT count(*) FROM internalized i LEFT JOIN updates u USING (update_id) WHERE u.update_id IS NULL) "
        "+ (SELECT count(*) FROM updates u LEFT JOIN checkpoints c ON c.checkpoint_id = u.checkpoint_out "
        "   WHERE c.checkpoint_id IS NULL) AS n")[0]["n"]
    assert orphans == 0
    # every checkpoint directory recorded exists, and no half-written temp directory was left behind
    for c in s.query("SELECT path FROM checkpoints WHERE step > 0"):
        assert (__import__("pathlib").Path(c["path"]) / "model.safetensors").exists()
    assert not list((root / "kill" / "checkpoints").glob("*/*.tmp-*"))
