"""Prefect task: abstract. If/Then subject heuristics for each diagnosed analysis (a generation in two_pass)."""

from prefect import task

from mel_core import stages
from tasks.common import run_stage, stage_cache_key


@task(name="abstract", cache_key_fn=stage_cache_key("abstract"), persist_result=True)
def abstract_task(config: dict, step: int, checkpoint: dict, upstream: dict | None = None) -> dict:
    """If/Then subject heuristics for each diagnosed analysis. `upstream` is the previous stage's manifest: it draws the DAG edge, not the cache key."""
    return run_stage("abstract", config, step, stages.abstract, checkpoint=checkpoint)
