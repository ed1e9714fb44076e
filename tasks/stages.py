"""The seven stages of a step as Prefect tasks, made by one factory.

Each task resolves the campaign's runtime, runs the stage body of ``mel_core.stages`` through the run's
bookkeeping (``tasks.common.run_stage``: one ``stage_runs`` row per execution) and returns its small manifest.
Its cache key is built from ids (``tasks.common.stage_cache_key``), so a new flow run of the same campaign
reuses every finished stage. Every task takes (config, step, checkpoint, upstream): `checkpoint` is the policy
version the step starts from (given to the stages that generate or train), `upstream` the previous stage's
manifest, which draws the DAG's edge and is not part of the cache key.
"""

from __future__ import annotations

import inspect

from prefect import task

from mel_core import stages
from mel_core.stage_names import STAGES
from tasks.common import run_stage, stage_cache_key


def _stage_task(name: str):
    body_fn = getattr(stages, name)
    takes_checkpoint = "ckpt" in inspect.signature(body_fn).parameters

    def stage_task(config: dict, step: int, checkpoint: dict, upstream: dict | None = None) -> dict:
        return run_stage(name, config, step, body_fn, checkpoint=checkpoint if takes_checkpoint else None)

    stage_task.__name__ = stage_task.__qualname__ = f"{name}_task"  # Prefect keys a task by its function's name
    stage_task.__doc__ = (body_fn.__doc__ or name).strip().splitlines()[0]
    return task(name=name, cache_key_fn=stage_cache_key(name), persist_result=True)(stage_task)


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}
