"""Prefect task: replay. Replay each question with its meta-experience in context; accept what verifies."""

from prefect import task

from mel_core import stages
from tasks.common import run_stage, stage_cache_key


@task(name="replay", cache_key_fn=stage_cache_key("replay"), persist_result=True)
def replay_task(config: dict, step: int, checkpoint: dict, upstream: dict | None = None) -> dict:
    """Replay each question with its meta-experience in context; accept what verifies. `upstream` is the previous stage's manifest: it draws the DAG edge, not the cache key."""
    return run_stage("replay", config, step, stages.replay, checkpoint=checkpoint)
