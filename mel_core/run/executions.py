"""Run bookkeeping around the stages: the run's registration, one `stage_runs` row per stage execution, and
the fault drills of ``orchestration.faults``.

The algorithm (mel_core.step.stages) does not know about any of it: ``execute`` wraps a stage body, records its
start and end (or its failure, with the error) and publishes the store for readers after each, and
``register_run`` runs once per campaign process, under the run lock (mel_core.run.lock).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid

from mel_core.config import to_dict
from mel_core.errors import InjectedFault, InjectedPermanentFault, interruption, is_transient
from mel_core.ids import now
from mel_core.model.checkpoints import Checkpoint, portable_path
from mel_core.step.runtime import Runtime
from mel_core.store import lineage, stage_records

_log = logging.getLogger("mel")
# (step, stage, signal name) of the last stage a signal stopped in this process (what `mel run` reports)
_stopped: dict = {}


def last_interrupted() -> tuple[int, str, str] | None:
    """(step, stage, 'SIGINT' or 'SIGTERM') of the last stage execution a signal stopped in this process."""
    return _stopped.get("at")


def execute(rt: Runtime, stage: str, step: int, fn, *args, cache_key: str | None = None, **kwargs):
    """Run one stage body and record the execution in `stage_runs` (one row per execution)."""
    row_id = uuid.uuid4().hex
    rt.stage_executions += 1
    t0 = time.perf_counter()
    rt.store.insert("stage_runs", [{"stage_run_id": row_id, "run_id": rt.run_id, "step": step, "stage": stage,
                                    "cache_key": cache_key, "started_at": now(), "status": "running"}])
    rt.store.publish()  # readers (mel runs, monitoring) see which stage is live
    try:
        _inject_fault(rt, stage, step, "before")
        out = fn(rt, *args, **kwargs)
        _inject_fault(rt, stage, step, "after")
    except BaseException as e:
        stopped = interruption(e)  # Ctrl-C or SIGTERM: the run is interrupted, not failed; it resumes here
        if stopped:
            _stopped["at"] = (step, stage, stopped)
            _log.warning("step %s %s interrupted (%s)", step, stage, stopped)
            status, error = "interrupted", f"stopped by {stopped}"
        else:
            retry = "a transient failure: retried if the stage's retries allow" if is_transient(e) else "not retried"
            _log.warning("step %s %s failed (%s: %s); %s", step, stage, type(e).__name__,
                         (str(e).splitlines() or [""])[0][:300], retry)
            status, error = "failed", f"{type(e).__name__}: {e}"[:2000]
        rt.store.update("stage_runs", "stage_run_id", [{
            "stage_run_id": row_id, "finished_at": now(), "seconds": time.perf_counter() - t0,
            "status": status, "error": error}])
        rt.store.publish()
        raise
    rt.store.update("stage_runs", "stage_run_id", [{
        "stage_run_id": row_id, "finished_at": now(), "seconds": time.perf_counter() - t0, "status": "completed"}])
    rt.store.publish()  # readers see the state as of the last committed stage
    return out


def _inject_fault(rt: Runtime, stage: str, step: int, when: str) -> None:
    """Fail as `orchestration.faults` asks; counted from stage_runs, so it holds across processes."""
    for f in rt.cfg.orchestration.faults:
        if (f.stage, f.step, f.when) != (stage, step, when):
            continue
        if f.kind == "kill":  # no exception, no bookkeeping: the process group is gone, as on a pre-emption
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if f.kind == "hang":  # a long stage: it ends when a signal (Ctrl-C, SIGTERM) raises in this thread
            while True:
                time.sleep(0.1)
        failed = stage_records.injected_failures(rt.store, rt.run_id, step, stage)
        if failed < f.times:
            cls = InjectedFault if f.kind == "transient" else InjectedPermanentFault
            raise cls(f"injected {f.kind} fault in {stage} at step {step} ({when} its body), #{failed + 1}")


def register_run(rt: Runtime, base: Checkpoint) -> None:
    """At the start of a campaign process (under the run lock): the run row and the checkpoint it starts from (the
    base or warm-started model, version 0), and executions a dead process left 'running' marked 'interrupted'.

    A fork (run.fork) records its parent run, step and checkpoint on its run row; its starting checkpoint is the
    parent's own row, copied with the parent's checkpoint chain and the lineage of what that chain internalized
    (mel_core.run.fork.references) the first time it registers, so lineage queries cross the fork in this store."""
    fork = rt.cfg.run.fork
    copies = {}
    if fork.run_id:
        from mel_core.run import fork as fork_mod
        first = lineage.checkpoint(rt.store, fork.checkpoint_id) is None  # a resumed fork has the references already
        fork_mod.pin_parent(rt.cfg, check=first)  # the parent's retention keeps the checkpoint the fork starts from
        if first:
            copies = fork_mod.references(rt.cfg)
    with rt.store.transaction() as w:
        for table, rows in copies.items():
            w.insert(table, rows)
        w.insert("runs", [{"run_id": rt.run_id, "name": rt.cfg.run.name, "config_hash": rt.config_hash,
                           "config_json": json.dumps(to_dict(rt.cfg), sort_keys=True), "created_at": now(),
                           "parent_run_id": fork.run_id or None, "parent_step": fork.step if fork.run_id else None,
                           "parent_checkpoint_id": fork.checkpoint_id or None,
                           "model_json": json.dumps(rt.model_provenance, sort_keys=True)}])
        w.insert("checkpoints", [{"checkpoint_id": base.checkpoint_id, "run_id": rt.run_id, "step": rt.start_step,
                                  "path": portable_path(base.path, rt.run_dir), "parent_checkpoint_id": None, "created_at": now()}])
        stage_records.mark_interrupted(w, rt.run_id)
    rt.store.publish()
