"""Prefect task: diagnose. The policy analyses each pair: bifurcation point and critique (one batched generation)."""

from prefect import task

from mel_core import stages
from tasks.common import run_stage, stage_cache_key


@task(name="diagnose", cache_key_fn=stage_cache_key("diagnose"), persist_result=True)
def diagnose_task(config: dict, step: int, checkpoint: dict, upstream: dict | None = None) -> dict:
    """The policy analyses each pair: bifurcation point and critique (one batched generation). `upstream` is the previous stage's manifest: it draws the DAG edge, not the cache key."""
    return run_stage("diagnose", config, step, stages.diagnose, checkpoint=checkpoint)
