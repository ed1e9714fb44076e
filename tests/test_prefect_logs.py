"""Prefect as Prefect users expect it: a campaign's flow runs are named after the run and step and tagged with the
run's name, id and seed; each stage's one-line summary reaches Prefect's API (the UI, `prefect flow-run logs`) while
`mel run` keeps the terminal to its own lines.

A real `mel run` in a process of its own (its temporary Prefect server on a fresh PREFECT_HOME, the micro model, a
scripted engine: tests/scripted_campaign.py), then a second process reads that PREFECT_HOME's database through
Prefect's client, as a user's `prefect flow-run ls` does after the campaign ended.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mel_core.store.reader import StoreReader

pytestmark = pytest.mark.slow

READ_BACK = textwrap.dedent("""
    import json
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    out = []
    with get_client(sync_client=True) as c:
        for fr in c.read_flow_runs():
            logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id])))
            out.append({"name": fr.name, "tags": sorted(fr.tags), "logs": [l.message for l in logs]})
    print("RESULT " + json.dumps(out))
""")


def test_flow_runs_are_named_tagged_and_carry_the_stage_logs_while_the_terminal_stays_quiet(tmp_path, micro_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    run = subprocess.run([sys.executable, "-m", "tests.scripted_campaign", "run", "--config", "configs/tiny.yaml",
                          "run.name=logged", "run.steps=1", f"run.root_dir={tmp_path / 'runs'}",
                          f"model.name_or_path={micro_model}", "sampling.prompts_per_step=4",
                          "sampling.group_size=4", "eval.every_n_steps=0", "run.seed=7"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    terminal = run.stdout + run.stderr
    assert "step   1 |" in terminal  # mel's own line
    assert "Finished in state" not in terminal and "sample step 1:" not in terminal  # Prefect's run logs are not

    read = subprocess.run([sys.executable, "-c", READ_BACK], env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-2000:]
    runs = {r["name"]: r for r in json.loads(read.stdout.split("RESULT ", 1)[1])}
    assert set(runs) == {"logged", "logged/step-1"}
    with StoreReader(tmp_path / "runs" / "logged" / "mel.duckdb") as store:
        (run_id,) = [r["run_id"] for r in store.query("SELECT run_id FROM runs")]
    for r in runs.values():
        assert {"run:logged", f"run_id:{run_id}", "seed:7"} <= set(r["tags"]), r["tags"]
    step_logs = runs["logged/step-1"]["logs"]
    # one summary line per stage, in the step's flow run, with the stage's counts (4 prompts x 4 rollouts)
    assert any(m.startswith("sample step 1: prompts=4, rollouts=16") for m in step_logs), step_logs
    for stage in ("verify", "pair", "diagnose", "abstract", "replay", "update"):
        assert any(m.startswith(f"{stage} step 1: ") for m in step_logs), (stage, step_logs)
