"""Crash safety: SIGKILL a campaign while `update` runs, or while a checkpoint is being written in the background
(run.async_save), start it again, and check the store.

The campaign runs in a subprocess of its own session (its own temporary Prefect server) with a scripted
engine (tests/scripted_campaign.py: mixed groups, accepted meta-experience) on a micro model. An injected
fault of kind `kill` SIGKILLs its process group as step 2's update begins — a pre-empted machine — or as step 2's
sample begins while step 1's checkpoint is held mid-write, at a moment the test chooses rather than one it has to
catch. The same command without the fault resumes it.
"""

import os
import subprocess
import sys

import pytest
import torch

from mel_core.model.checkpoints import resolve_checkpoint_path
from mel_core.store.reader import StoreReader
from mel_core.store.writer import Store

pytestmark = pytest.mark.slow

STEPS = 2


def _run(root, model, *more, env=None):
    cmd = [sys.executable, "-m", "tests.scripted_campaign", "run", "--config", "configs/tiny.yaml", "run.name=kill",
           f"run.steps={STEPS}", f"run.root_dir={root}", f"model.name_or_path={model}",
           "sampling.prompts_per_step=4", "sampling.group_size=4", *more]
    # Its own session: the kill takes the whole process group (the campaign and the temporary Prefect
    # server it started), as a pre-empted machine would.
    return subprocess.run(cmd, capture_output=True, text=True, start_new_session=True, timeout=900,
                          env={**os.environ, **(env or {})})


def test_sigkill_during_update_then_resume(tmp_path, micro_model):
    root = tmp_path / "runs"
    db = root / "kill" / "mel.duckdb"
    killed = _run(root, micro_model, "orchestration.faults=[{stage: update, step: 2, when: before, kind: kill}]")
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    with StoreReader(db) as r:  # what a reader saw last: update of step 2 running
        assert r.query("SELECT stage, step FROM stage_runs WHERE status = 'running'") == [{"stage": "update", "step": 2}]
    before = Store(db).query("SELECT stage, step FROM stage_runs WHERE status = 'completed'")

    resumed = _run(root, micro_model)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "took over the lock" in resumed.stdout  # the dead campaign's lock, logged

    s = Store(db)
    # no finished stage ran twice: every (step, stage) has exactly one completed execution
    runs = s.query("SELECT step, stage, count(*) AS n FROM stage_runs WHERE status = 'completed' GROUP BY ALL")
    assert all(r["n"] == 1 for r in runs), runs
    assert {(r["stage"], r["step"]) for r in before} <= {(r["stage"], r["step"]) for r in runs}
    # the killed update is the only stage that executed again; the resumed campaign marked its first try
    again = s.query("SELECT stage, step, status FROM stage_runs WHERE status != 'completed'")
    assert again == [{"stage": "update", "step": 2, "status": "interrupted"}]
    # no duplicate or orphan rows
    assert s.query("SELECT count(*) AS n FROM updates")[0]["n"] == STEPS
    assert s.query("SELECT count(*) AS n FROM checkpoints")[0]["n"] == STEPS + 1
    assert s.query("SELECT count(*) AS n FROM internalized")[0]["n"] > 0  # the constructed step had M to learn
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
    for c in s.query("SELECT path FROM checkpoints WHERE step > 0"):  # recorded relative to the run directory
        assert not c["path"].startswith("/") and (root / "kill" / c["path"] / "model.safetensors").exists()
    assert not list((root / "kill" / "checkpoints").glob("*/*.tmp-*"))


def _orphans(s) -> int:
    return s.query(
        "SELECT (SELECT count(*) FROM rollouts r LEFT JOIN prompts p USING (prompt_id) WHERE p.prompt_id IS NULL) "
        "+ (SELECT count(*) FROM internalized i LEFT JOIN updates u USING (update_id) WHERE u.update_id IS NULL) "
        "+ (SELECT count(*) FROM updates u LEFT JOIN checkpoints c ON c.checkpoint_id = u.checkpoint_out "
        "   WHERE c.checkpoint_id IS NULL) "
        "+ (SELECT count(*) FROM steps s LEFT JOIN checkpoints c ON c.checkpoint_id = s.policy_version_id "
        "   WHERE c.checkpoint_id IS NULL) AS n")[0]["n"]


def test_sigkill_during_a_background_save_then_resume(tmp_path, micro_model):
    """run.async_save: step 1's checkpoint is still being written (its temp directory filled, not yet renamed:
    MEL_TEST_SAVE_PAUSE holds it there) when the process group is SIGKILLed as step 2's sample begins. Step 1's
    update had finished as a stage, its Prefect result stored; its rows had not committed. The rerun recomputes step
    1's update from the base checkpoint — it does not take the stored result — and ends with an undisturbed run's
    records and weights."""
    from safetensors.torch import load_file

    root = tmp_path / "runs"
    db = root / "kill" / "mel.duckdb"
    killed = _run(root, micro_model, "orchestration.faults=[{stage: sample, step: 2, when: before, kind: kill}]",
                  env={"MEL_TEST_SAVE_PAUSE": "120"})
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    s = Store(db)
    n = lambda sql: s.query(sql)[0]["n"]
    runs = s.query("SELECT stage, step, status FROM stage_runs WHERE stage IN ('update', 'sample') ORDER BY ALL")
    assert runs == [{"stage": "sample", "step": 1, "status": "completed"}, {"stage": "sample", "step": 2,
                    "status": "running"}, {"stage": "update", "step": 1, "status": "completed"}]
    assert n("SELECT count(*) AS n FROM updates") == n("SELECT count(*) AS n FROM checkpoints WHERE step > 0") == 0
    for table in ("steps", "prompts", "rollouts"):  # nothing of step 2 before step 1's checkpoint
        assert n(f"SELECT count(*) AS n FROM {table} WHERE step = 2") == 0, table
    ckpts = root / "kill" / "checkpoints"
    assert len(list(ckpts.glob("*/step-00001.tmp-*"))) == 1 and not list(ckpts.glob("*/step-00001"))

    resumed = _run(root, micro_model)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    s = Store(db)
    runs = s.query("SELECT stage, step, list(status ORDER BY started_at) AS statuses FROM stage_runs "
                   "WHERE stage IN ('update', 'sample') GROUP BY ALL ORDER BY ALL")
    assert runs == [{"stage": "sample", "step": 1, "statuses": ["completed"]},
                    {"stage": "sample", "step": 2, "statuses": ["interrupted", "completed"]},
                    {"stage": "update", "step": 1, "statuses": ["completed", "completed"]},  # recomputed
                    {"stage": "update", "step": 2, "statuses": ["completed"]}]
    assert n("SELECT count(*) AS n FROM updates") == STEPS
    assert n("SELECT count(*) AS n FROM checkpoints") == STEPS + 1
    assert _orphans(s) == 0
    assert not list(ckpts.glob("*/*.tmp-*"))  # the dead process's temp directory: removed by the rewrite

    undisturbed = _run(tmp_path / "undisturbed", micro_model)
    assert undisturbed.returncode == 0, undisturbed.stdout[-2000:] + undisturbed.stderr[-2000:]
    reference = Store(tmp_path / "undisturbed" / "kill" / "mel.duckdb")
    columns = "step, checkpoint_in, checkpoint_out, loss, rl_loss, nll_loss, grad_norm, num_sequences, " \
              "num_nll_sequences"
    assert s.query(f"SELECT {columns} FROM updates ORDER BY step") == \
        reference.query(f"SELECT {columns} FROM updates ORDER BY step")
    dirs = (root / "kill", tmp_path / "undisturbed" / "kill")
    for a, b in zip(*(st.query("SELECT path FROM checkpoints WHERE step > 0 ORDER BY step") for st in (s, reference))):
        got, want = (load_file(resolve_checkpoint_path(r["path"], d) / "model.safetensors")
                     for r, d in zip((a, b), dirs))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
