"""Prefect task: build (first run only) the policy's starting checkpoint."""

from prefect import task

from mel_core.bookkeeping import execute
from mel_core.runtime import get_runtime


def _key(context, parameters: dict) -> str:
    return get_runtime(parameters["config"]).base_checkpoint_key()


@task(name="warm_start", cache_key_fn=_key, persist_result=True)
def warm_start_task(config: dict) -> dict:
    """The tiny model is trained once and cached on disk; a real model is used as it is."""
    rt = get_runtime(config)
    return execute(rt, "warm_start", 0, lambda rt: rt.base_checkpoint).as_dict()
