"""Prefect task: pair. Contrastive (correct, incorrect) pairs from the step's mixed groups."""

from prefect import task

from mel_core import stages
from tasks.common import run_stage, stage_cache_key


@task(name="pair", cache_key_fn=stage_cache_key("pair"), persist_result=True)
def pair_task(config: dict, step: int, upstream: dict | None = None) -> dict:
    """Contrastive (correct, incorrect) pairs from the step's mixed groups. `upstream` is the previous stage's manifest: it draws the DAG edge, not the cache key."""
    return run_stage("pair", config, step, stages.pair)
