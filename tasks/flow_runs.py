"""The flow runs a campaign process leaves behind when it dies, and marking them Crashed.

A SIGKILLed campaign cannot report its end: its campaign flow run, the step (or evaluation) flow run it was in
and that one's running task stay "Running" in the Prefect UI forever. Prefect's own remedy, an automation on
flow-run heartbeats, does not fit: it needs a server that outlives the process (a `mel run` campaign's
temporary server dies with it), and every step flow run would have to send heartbeats, which costs up to
1 s per step (flows/campaign.py, without_flow_heartbeat). Instead the campaign writes its flow run id into
the run lock's record (mel_core.run.lock); the process that takes the lock over after a death reads it and
marks that flow run, its sub flow runs and their task runs that are not in a final state Crashed, with a
message naming the flow run that took over.
"""

from __future__ import annotations

from uuid import UUID

from prefect.client.schemas.objects import StateType

# States a live run passes through; a dead process's run in one of them will never leave it by itself.
UNFINISHED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def this_flow_run() -> dict | None:
    """The flow run this code runs in, as the run lock records it: id, name and the Prefect API it lives on."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    return {"flow_run_id": str(ctx.flow_run.id), "flow_run_name": ctx.flow_run.name,
            "api_url": PREFECT_API_URL.value() or f"temporary server on {PREFECT_HOME.value()}"}


def tag_this_flow_run(tags: list[str]) -> None:
    """Add `tags` to the flow run this code runs in (its own tags are fixed when it is created, before a campaign
    knows its run id). Bookkeeping for the UI: a failure is ignored, never raised."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, tags=sorted(set(ctx.flow_run.tags) | set(tags)))
    except Exception:  # noqa: BLE001 - the UI's tags never stop a campaign
        pass


def crashed_message(successor: dict) -> str:
    """What a dead campaign's flow runs say in the UI: who took over."""
    who = successor.get("prefect") or {}
    return (f"the campaign's process ended without finishing (killed or its machine lost); taken over by flow run "
            f"{who.get('flow_run_name', '?')} ({who.get('flow_run_id', '?')}), pid {successor.get('pid')} on "
            f"{successor.get('host')}")


def crash_orphans(dead: dict, successor: dict) -> list[str] | None:
    """Mark the dead process's campaign flow run (``dead["prefect"]``, from its lock record), every flow run below
    it and their task runs Crashed where they are not already in a final state. Returns what was marked
    ("flow run NAME" / "task run NAME"); None when this Prefect API does not have that flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    root = (dead.get("prefect") or {}).get("flow_run_id")
    if not root:
        return None
    message = crashed_message(successor)
    marked = []
    with get_client(sync_client=True) as client:
        try:
            runs = [client.read_flow_run(UUID(root))]
        except ObjectNotFound:
            return None  # recorded on another Prefect API (the caller says which)
        # Only unfinished runs can hold unfinished sub flow runs: a long campaign's hundreds of finished steps
        # are never read.
        runs = [r for r in runs if _unfinished(r)]
        frontier = [r.id for r in runs]
        while frontier:  # sub flow runs, level by level (a step's flow run, an evaluation's)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED))))
            runs += children
            frontier = [c.id for c in children]
        for run in runs:
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            marked.append(f"flow run {run.name}")
        if runs:
            tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in runs]),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED))))
            for t in tasks:
                client.set_task_run_state(t.id, Crashed(message=message), force=True)
                marked.append(f"task run {t.name}")
    return marked


def _unfinished(run) -> bool:
    return run.state is not None and not run.state.is_final()
