"""Prefect task: evaluate one checkpoint on one dataset (greedy Pass@1, Avg@k / Pass@k; no experience in context)."""

from prefect import task

from mel_core import evaluate as evaluate_mod
from mel_core.runtime import Checkpoint, get_runtime


def _key(context, parameters: dict) -> str:
    """From ids: the run owning the checkpoint, the store's epoch, the checkpoint, the dataset, the eval config."""
    rt = get_runtime(parameters["config"])
    return "-".join(["evaluate", f"v{evaluate_mod.EVAL_VERSION}", parameters.get("run_id") or rt.run_id, rt.epoch,
                     parameters["checkpoint"]["checkpoint_id"], parameters["dataset"],
                     evaluate_mod.eval_config_hash(rt.cfg, parameters["dataset"])])


@task(name="evaluate", cache_key_fn=_key, persist_result=True)
def evaluate_task(config: dict, checkpoint: dict, dataset: str, run_id: str | None = None,
                  step: int | None = None) -> dict:
    """Evaluate `checkpoint` on `dataset`; rows go to `evals` / `eval_samples`; returns the metrics."""
    rt = get_runtime(config)
    ckpt = Checkpoint(checkpoint["checkpoint_id"], checkpoint["path"])
    return evaluate_mod.evaluate(rt, ckpt, dataset, run_id=run_id, step=step)
