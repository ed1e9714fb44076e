"""What every stage task shares: the cache key, the retry and timeout policy, and the recording of executions.

Cache keys are built from ids — stage + stage version, run id, config hash, the DuckDB file's epoch, step and
policy version — never from Prefect's RUN_ID or from hashed tensors, so a *new* flow run of the same campaign
reuses every finished stage, and a deleted store invalidates its cache.
"""

from __future__ import annotations

from functools import lru_cache

from mel_core.errors import is_transient
from mel_core.model.checkpoints import Checkpoint
from mel_core.run.executions import execute
from mel_core.step.runtime import RunHandle, runtime_of
from mel_core.step.stages import STAGE_VERSIONS


def stage_cache_key(stage: str):
    def key(context, parameters: dict) -> str:
        rt = runtime_of(parameters["run"])
        ckpt = parameters.get("checkpoint")
        return "-".join([stage, f"v{STAGE_VERSIONS[stage]}", rt.run_id, rt.config_hash, rt.epoch,
                         str(parameters.get("step", "")), ckpt.checkpoint_id if ckpt else ""])
    return key


def _retry_transient(task, task_run, state) -> bool:
    """Retry only failures that can pass (see mel_core.errors): a data error fails at once."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


@lru_cache(maxsize=None)
def configured(task, run: RunHandle):
    """The task with this campaign's result storage (its run directory: deleting the run clears its cache) and its
    stage's retry and timeout policy (orchestration.stages[task.name], else orchestration.default); made once per
    (task, run) in a process."""
    rt = runtime_of(run)
    orch = rt.cfg.orchestration
    policy = orch.stages.get(task.name, orch.default)
    delays = [policy.retry_delay_s * policy.retry_backoff ** i for i in range(policy.retries)]
    return task.with_options(result_storage=rt.run_dir / "prefect-results", retries=policy.retries,
                             retry_delay_seconds=delays or 0, timeout_seconds=policy.timeout_s,
                             retry_condition_fn=_retry_transient)


def run_stage(run: RunHandle, stage: str, step: int, body, *args):
    """The stage body on this process's runtime, its execution recorded in stage_runs under the task's cache key."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    key = ctx.task_run.cache_key if ctx and ctx.task_run else None
    manifest = execute(runtime_of(run), stage, step, _located(body), step, *args, cache_key=key)
    if ctx is not None:
        # to the task run's log in Prefect's API and UI (`prefect flow-run logs`); the terminal shows it with -v only
        from prefect.logging import get_run_logger
        get_run_logger().info(f"{stage} step {step}: {manifest_line(manifest)}")
    return manifest


def manifest_line(manifest: dict) -> str:
    """A stage's manifest as one log line: its counts, a checkpoint by id."""
    def shown(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(getattr(v, "checkpoint_id", v))
    return ", ".join(f"{k}={shown(v)}" for k, v in manifest.items() if k != "step")


def _located(body):
    """The body with every Checkpoint it is given where it is now (Runtime.locate): a checkpoint a cached result
    of an earlier process handed on names the directory it had then, and the run may since have been moved or
    copied. A checkpoint that is nowhere fails the stage at once (MissingCheckpoint: permanent, not retried)."""
    def run(rt, step, *args):
        return body(rt, step, *(rt.locate(a) if isinstance(a, Checkpoint) else a for a in args))
    return run


