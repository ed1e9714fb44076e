"""SQL while training, and the provenance a finished campaign leaves behind.

A two-step campaign runs in a subprocess against the session's Prefect server, with a scripted engine on a
micro model (tests/scripted_campaign.py: mixed groups whose meta-experience is accepted, so lineage has
something to show); this process polls it with the real `mel query` command (in-process), which reads the
published snapshot. Afterwards the same run answers the named views, `mel lineage` both ways, and its
per-step Prefect artifacts.
"""

import contextlib
import io
import os
import subprocess
import sys
import time

import pytest

from mel_app import cli
from mel_core.store.reader import StoreReader
from mel_core.store.schema import VIEWS

pytestmark = pytest.mark.slow

STEPS = 2
# The named views the README documents, for the questions users ask most.
NAMED_VIEWS = ("heuristic_lineage", "checkpoint_heuristics", "step_acceptance", "step_summary", "stage_timings")


def mel(*argv) -> tuple[int, str, str]:
    """`mel ARGV` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def _value(table: str) -> int:
    """The one value of a one-row, one-column `mel query` table (header, rule, value, row count)."""
    return int(table.splitlines()[2])


@pytest.fixture(scope="module")
def live_campaign(prefect_harness, tmp_path_factory, micro_model):
    """(db, reads): reads = (stage executions, rollouts) seen by each query that ended while the
    campaign was still running."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("runs")
    db = root / "live" / "mel.duckdb"
    cmd = [sys.executable, "-m", "tests.scripted_campaign", "run", "--config", "configs/tiny.yaml", "run.name=live",
           f"run.steps={STEPS}", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
           "sampling.prompts_per_step=4", "sampling.group_size=4"]
    log = root / "campaign.log"
    proc = subprocess.Popen(cmd, env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    reads = []
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if db.exists():
                rc_runs, runs, err_runs = mel("query", "--db", str(db), "SELECT count(*) AS n FROM stage_runs")
                rc_rollouts, rollouts, err_rollouts = mel("query", "--db", str(db), "SELECT count(*) AS n FROM rollouts")
                assert rc_runs == 0 and rc_rollouts == 0, (err_runs, err_rollouts)
                if proc.poll() is None:
                    reads.append((_value(runs), _value(rollouts)))
            time.sleep(0.3)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    return db, reads


def test_queries_succeed_and_see_progress_while_the_campaign_writes(live_campaign):
    _, reads = live_campaign
    assert len(reads) >= 5, reads
    executions = [r[0] for r in reads]
    assert executions == sorted(executions), "a later read saw fewer stage executions"
    assert len(set(executions)) >= 3, f"reads did not see the campaign progress: {reads}"
    assert len({r[1] for r in reads}) >= 2, reads  # and rollouts arriving


def test_named_views_answer_and_writes_are_refused(live_campaign):
    db, _ = live_campaign
    assert set(NAMED_VIEWS) <= set(VIEWS)
    for view in NAMED_VIEWS:
        rc, out, err = mel("query", "--db", str(db), f"SELECT count(*) AS n FROM {view}")
        assert rc == 0 and _value(out) > 0, (view, out, err)
    rc, out, _ = mel("query", "--db", str(db), "SELECT step, retention_ratio FROM step_acceptance ORDER BY step")
    assert rc == 0 and out.splitlines()[-1] == f"({STEPS} rows)"
    for sql in ("DELETE FROM rollouts", "DROP VIEW step_acceptance", "CREATE TABLE x (a INT)"):
        rc, _, err = mel("query", "--db", str(db), sql)
        assert rc == 2 and "refused" in err and len(err.strip().splitlines()) == 1, (sql, err)


def test_lineage_both_ways(live_campaign):
    db, _ = live_campaign
    s = StoreReader(db)
    learned = s.query("SELECT heuristic_id, internalized_in_checkpoint AS ckpt, prompt_id, policy_version_id "
                      "FROM heuristic_lineage WHERE internalized_in_checkpoint IS NOT NULL ORDER BY heuristic_id")
    assert learned, "no heuristic was internalized in this run"
    h = learned[0]
    rc, out, err = mel("lineage", "--db", str(db), h["heuristic_id"])
    assert rc == 0, err
    for part in (h["prompt_id"], h["policy_version_id"], f"-> checkpoint {h['ckpt']}", "incorrect rollout",
                 "correct rollout"):
        assert part in out, part
    rc, out, _ = mel("lineage", "--db", str(db), "--checkpoint", h["ckpt"])
    assert rc == 0
    assert {ln.split()[0] for ln in out.splitlines() if ln.startswith("    heuristic_")} == {
        r["heuristic_id"] for r in learned if r["ckpt"] == h["ckpt"]}


def test_each_step_publishes_artifacts_under_stable_keys(live_campaign):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        for key in ("mel-live-accepted-heuristics", "mel-live-step-summary"):
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert len(arts) == STEPS, (key, len(arts))  # one version per step: the UI shows their history
