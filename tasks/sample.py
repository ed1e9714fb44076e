"""Prefect task: sample. Sample G rollouts for each of the step's B prompts from the current policy."""

from prefect import task

from mel_core import stages
from tasks.common import run_stage, stage_cache_key


@task(name="sample", cache_key_fn=stage_cache_key("sample"), persist_result=True)
def sample_task(config: dict, step: int, checkpoint: dict, upstream: dict | None = None) -> dict:
    """Sample G rollouts for each of the step's B prompts from the current policy. `upstream` is the previous stage's manifest: it draws the DAG edge, not the cache key."""
    return run_stage("sample", config, step, stages.sample, checkpoint=checkpoint)
