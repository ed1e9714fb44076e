"""SQL while training: `mel query` reads the DuckDB file while a campaign in another process writes it.

The campaign runs in a subprocess against the session's Prefect server; this process polls it with
the real `mel query` command (in-process) between the campaign's writes.
"""

import os
import subprocess
import sys
import time

import pytest

from mel_core import cli
from mel_core.store import VIEWS

pytestmark = pytest.mark.slow

# The named views the README documents, for the questions users ask most.
NAMED_VIEWS = ("heuristic_lineage", "checkpoint_heuristics", "step_acceptance", "step_summary", "stage_timings")


def _query(capsys, db, sql) -> tuple[int, str]:
    rc = cli.main(["query", "--db", str(db), sql])
    out = capsys.readouterr()
    return rc, out.out if rc == 0 else out.err


def _count(table_output: str) -> int:
    """The one value of a one-row, one-column `mel query` table (header, rule, value, row count)."""
    return int(table_output.splitlines()[2])


def test_queries_succeed_and_see_progress_while_the_campaign_writes(prefect_harness, tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL

    db = tmp_path / "runs" / "live" / "mel.duckdb"
    cmd = [sys.executable, "-m", "mel_core.cli", "run", "--config", "configs/tiny.yaml", "run.name=live",
           "run.steps=2", f"run.root_dir={tmp_path / 'runs'}", "sampling.prompts_per_step=8"]
    log = tmp_path / "campaign.log"
    proc = subprocess.Popen(cmd, env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    reads = []  # (stage executions, rollouts) seen by reads that finished while the campaign still ran
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if db.exists():
                rc_runs, runs = _query(capsys, db, "SELECT count(*) AS n FROM stage_runs")
                rc_rollouts, rollouts = _query(capsys, db, "SELECT count(*) AS n FROM rollouts")
                assert rc_runs == 0 and rc_rollouts == 0, (runs, rollouts)
                if proc.poll() is None:
                    reads.append((_count(runs), _count(rollouts)))
            time.sleep(0.3)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)

    assert len(reads) >= 5, reads
    executions = [r[0] for r in reads]
    assert executions == sorted(executions), "a later read saw fewer stage executions"
    assert len(set(executions)) >= 3, f"reads did not see the campaign progress: {reads}"
    assert len({r[1] for r in reads}) >= 2, reads  # and rollouts arriving

    # after the campaign: the named views answer, and writes are refused with a clear error
    assert set(NAMED_VIEWS) <= set(VIEWS)
    for view in NAMED_VIEWS:
        rc, out = _query(capsys, db, f"SELECT count(*) AS n FROM {view}")
        assert rc == 0 and _count(out) > 0, (view, out)
    rc, out = _query(capsys, db, "SELECT step, retention_ratio FROM step_acceptance ORDER BY step")
    assert rc == 0 and out.splitlines()[-1] == "(2 rows)"
    for sql in ("DELETE FROM rollouts", "DROP VIEW step_acceptance", "CREATE TABLE x (a INT)"):
        rc, err = _query(capsys, db, sql)
        assert rc == 2 and "read-only" in err, (sql, err)
