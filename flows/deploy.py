"""Deployment entry point: a campaign from a config path + overrides (validated before any work).

`mel deploy` creates the deployment from prefect.yaml; :func:`trigger` starts one of its runs on the
server's work pool and waits for it. A worker's flow run starts in the checkout (prefect.yaml's pull step), but
its run is written under the directory it was asked from — `work_dir`: where `mel deploy --run` ran, else where
`mel serve` started the worker (MEL_WORK_DIR) — so no run lands in the installed checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from flows.campaign import campaign
from mel_core import config as config_mod


@flow(name="mel-campaign-from-file")
def campaign_from_file(config_path: str = "configs/tiny.yaml", overrides: list[str] | None = None,
                       work_dir: str | None = None) -> dict:
    work = Path(work_dir or os.environ.get("MEL_WORK_DIR") or os.getcwd())
    given = work / config_path
    path = given if given.is_file() else Path(config_path)  # the user's file, else the checkout's (configs/...)
    cfg = config_mod.load(str(path), overrides or [])  # a misspelled key fails here, naming it
    d = config_mod.to_dict(cfg)
    for key in ("root_dir", "cache_dir"):  # relative to where the run was asked from
        d["run"][key] = str(work / d["run"][key])
    return campaign(d)


def trigger(deployment: str, config_path: str, overrides: list[str], timeout_s: float | None):
    """Run `deployment` (its name in prefect.yaml) of this flow with these parameters; the final flow run (state
    included) once it ends, or the still-running one after `timeout_s`. The API is PREFECT_API_URL's."""
    from prefect.deployments import run_deployment

    return run_deployment(f"{campaign_from_file.name}/{deployment}",
                          parameters={"config_path": config_path, "overrides": list(overrides),
                                      "work_dir": os.getcwd()}, timeout=timeout_s)


def failure_lines(flow_run) -> list[str]:
    """Why a deployed campaign failed, for the terminal: each failed task run below it (its stage, step and error
    line) and the flow run's own message, then where the whole log is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    lines = []
    with get_client(sync_client=True) as client:
        flow_runs = [flow_run]
        while True:  # the campaign's sub flow runs (its steps, its evaluations), all levels down
            below = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[f.id for f in flow_runs])))
            new = [f for f in below if f.id not in {g.id for g in flow_runs}]
            if not new:
                break
            flow_runs += new
        failed = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[f.id for f in flow_runs]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED]))))
    for t in failed:
        message = ((t.state.message if t.state else "") or "").strip().splitlines()
        lines.append(f"failed: task run {t.name}: {message[0][:300] if message else '(no message)'}")
    own = ((flow_run.state.message if flow_run.state else "") or "").strip().splitlines()
    if own:
        lines.append(f"flow run {flow_run.name}: {own[0][:300]}")
    lines.append(f"its log: prefect flow-run logs {flow_run.id} (or the flow run's page in the UI)")
    return lines
