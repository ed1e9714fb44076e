"""Prefect task: verify. Score every rollout of the step (binary verifiable reward)."""

from prefect import task

from mel_core import stages
from tasks.common import run_stage, stage_cache_key


@task(name="verify", cache_key_fn=stage_cache_key("verify"), persist_result=True)
def verify_task(config: dict, step: int, upstream: dict | None = None) -> dict:
    """Score every rollout of the step (binary verifiable reward). `upstream` is the previous stage's manifest: it draws the DAG edge, not the cache key."""
    return run_stage("verify", config, step, stages.verify)
