"""Prefect task: the policy's starting checkpoint (the tiny model's warm start is built once and cached on disk; a
real model is used as it is)."""

from prefect import task

from mel_core.model.checkpoints import Checkpoint
from mel_core.run.executions import execute
from mel_core.step.runtime import RunHandle, runtime_of
from mel_core.step.stages import STAGE_VERSIONS


def _key(context, parameters: dict) -> str:
    """What the starting policy is: the tiny warm start's shaping config, or the model path."""
    rt = runtime_of(parameters["run"])
    if rt.cfg.model.name_or_path == "tiny":
        from mel_core.model import tiny
        return f"warm_start-v{STAGE_VERSIONS['warm_start']}-{tiny.warm_start_key(rt.cfg)}-{rt.run_id}-{rt.epoch}"
    return f"base-{rt.cfg.model.name_or_path}-{rt.run_id}-{rt.epoch}"


@task(name="warm_start", cache_key_fn=_key, persist_result=True)
def warm_start(run: RunHandle) -> Checkpoint:
    """Version 0 of the policy."""
    return execute(runtime_of(run), "warm_start", 0, lambda rt: rt.base_checkpoint)
