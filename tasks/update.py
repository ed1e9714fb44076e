"""Prefect task: update. One optimizer step on L_RL + lambda * L_NLL; writes the next checkpoint."""

from prefect import task

from mel_core import stages
from tasks.common import run_stage, stage_cache_key


@task(name="update", cache_key_fn=stage_cache_key("update"), persist_result=True)
def update_task(config: dict, step: int, checkpoint: dict, upstream: dict | None = None) -> dict:
    """One optimizer step on L_RL + lambda * L_NLL; writes the next checkpoint. `upstream` is the previous stage's manifest: it draws the DAG edge, not the cache key."""
    return run_stage("update", config, step, stages.update, checkpoint=checkpoint)
