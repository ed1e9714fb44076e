"""Prefect task: build (first run only) the policy's starting checkpoint."""

from prefect import task

from mel_core import stages
from mel_core.runtime import get_runtime


def _key(context, parameters: dict) -> str:
    return stages.base_checkpoint_key(get_runtime(parameters["config"]))


@task(name="warm_start", cache_key_fn=_key, persist_result=True)
def warm_start_task(config: dict) -> dict:
    """The tiny model is trained once and cached on disk; a real model is used as it is."""
    rt = get_runtime(config)
    return stages.execute(rt, "warm_start", 0, stages.base_checkpoint).as_dict()
