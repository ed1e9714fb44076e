"""What every stage task shares: the cache key and the recording of executions.

Cache keys are built from ids — stage + stage version, run id, the DuckDB file's epoch, step and
policy version — never from Prefect's RUN_ID or from hashed tensors, so a *new* flow run of the same
campaign reuses every finished stage, and a deleted store invalidates its cache.
"""

from __future__ import annotations

from pathlib import Path

from mel_core.bookkeeping import execute
from mel_core.errors import is_transient
from mel_core.runtime import Checkpoint, get_runtime
from mel_core.stage_names import STAGE_VERSIONS


def stage_cache_key(stage: str):
    def key(context, parameters: dict) -> str:
        rt = get_runtime(parameters["config"])
        ckpt = parameters.get("checkpoint") or {}
        parts = [stage, f"v{STAGE_VERSIONS[stage]}", rt.run_id, rt.config_hash, rt.epoch,
                 str(parameters.get("step", "")), ckpt.get("checkpoint_id", "")]
        return "-".join(parts)
    return key


def results_dir(config: dict) -> Path:
    """Task results (small manifests) live with the run, so deleting the run clears its cache."""
    return get_runtime(config).run_dir / "prefect-results"


def _retry_transient(task, task_run, state) -> bool:
    """Retry only failures that can pass (see mel_core.errors): a data error fails at once."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def configured(task, stage: str, config: dict):
    """The task with this campaign's result storage and the stage's retry/timeout policy."""
    orch = get_runtime(config).cfg.orchestration
    policy = orch.stages.get(stage, orch.default)
    delays = [policy.retry_delay_s * policy.retry_backoff ** i for i in range(policy.retries)]
    return task.with_options(result_storage=results_dir(config), retries=policy.retries,
                             retry_delay_seconds=delays or 0, timeout_seconds=policy.timeout_s,
                             retry_condition_fn=_retry_transient)


def run_stage(stage: str, config: dict, step: int, fn, *args, checkpoint: dict | None = None) -> dict:
    """Resolve the runtime, run the stage body with its execution recorded in stage_runs."""
    from prefect.context import TaskRunContext

    rt = get_runtime(config)
    ctx = TaskRunContext.get()
    key = ctx.task_run.cache_key if ctx and ctx.task_run else None
    extra = (Checkpoint(checkpoint["checkpoint_id"], checkpoint["path"]),) if checkpoint is not None else ()
    return execute(rt, stage, step, fn, step, *extra, *args, cache_key=key)
