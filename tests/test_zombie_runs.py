"""No zombie runs in the UI: a campaign SIGKILLed in step 2's update leaves its campaign flow run, the step-2
flow run and the update task run "Running" on the Prefect server; the campaign that resumes it marks them
Crashed, naming itself, and ends Completed.

The drill of tests/test_resume_kill.py (an injected `kind: kill` fault, a scripted engine on a micro model), but
against a standalone Prefect server (its own session: the kill takes the campaign's process group, not the
server), as `mel serve` runs one for the UI.
"""

import os
import subprocess
import sys

import pytest

from tests.servers import standalone_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A standalone Prefect server with its own state; yields its API URL."""
    with standalone_server(tmp_path_factory.mktemp("prefect")) as (url, _):
        yield url


def _campaign(url, root, model, *more):
    cmd = [sys.executable, "-m", "tests.scripted_campaign", "run", "--config", "configs/tiny.yaml", "run.name=zombie",
           "run.steps=2", f"run.root_dir={root}", f"model.name_or_path={model}", "sampling.prompts_per_step=4",
           "sampling.group_size=4", *more]
    return subprocess.run(cmd, capture_output=True, text=True, start_new_session=True, timeout=900,
                          env=dict(os.environ, PREFECT_API_URL=url))


def _flow_runs(url):
    """name -> [(flow name, state type, state message)] of every flow run on the server, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
        flows = {f.id: f.name for f in client.read_flows()}
        tasks = client.read_task_runs()
    return runs, flows, tasks


def test_a_resumed_campaign_crashes_the_killed_ones_flow_runs(server, tmp_path, micro_model):
    root = tmp_path / "runs"
    killed = _campaign(server, root, micro_model,
                       "orchestration.faults=[{stage: update, step: 2, when: before, kind: kill}]")
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    runs, flows, tasks = _flow_runs(server)
    zombies = {(flows[r.flow_id], r.name) for r in runs if r.state_type.value == "RUNNING"}
    assert ("mel-campaign", runs[0].name) in zombies and ("mel-iteration", "zombie/step-2") in zombies  # what the UI showed
    dead_campaign = runs[0]

    resumed = _campaign(server, root, micro_model)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "marked Crashed what the dead campaign left unfinished" in resumed.stdout

    runs, flows, tasks = _flow_runs(server)
    assert not [r.name for r in runs if not r.state.is_final()]  # nothing left Running
    successor = [r for r in runs if flows[r.flow_id] == "mel-campaign" and r.id != dead_campaign.id]
    assert [r.state_type.value for r in successor] == ["COMPLETED"]
    by_id = {r.id: r for r in runs}
    dead = by_id[dead_campaign.id]
    assert dead.state_type.value == "CRASHED"
    assert f"taken over by flow run {successor[0].name} ({successor[0].id})" in dead.state.message
    killed_step = [r for r in runs if r.name == "zombie/step-2" and r.state_type.value == "CRASHED"]
    assert len(killed_step) == 1 and successor[0].name in killed_step[0].state.message
    # the step's update task run too, and the finished ones kept their states
    crashed_tasks = {t.name.split("-")[0] for t in tasks if t.flow_run_id == killed_step[0].id
                     and t.state_type.value == "CRASHED"}
    assert crashed_tasks == {"update"}
    step1 = [r for r in runs if r.name == "zombie/step-1"]
    assert step1 and all(r.state_type.value == "COMPLETED" for r in step1)
