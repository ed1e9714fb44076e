"""Prefect task: evaluate one checkpoint on one dataset (greedy Pass@1, Avg@k / Pass@k; no experience in context)."""

from prefect import task

from mel_core.model.checkpoints import Checkpoint
from mel_core.step.runtime import RunHandle, runtime_of
from mel_core.study import evaluation


def _key(context, parameters: dict) -> str:
    """From ids: the run owning the checkpoint, the store's epoch, the checkpoint, the dataset, the eval config."""
    rt = runtime_of(parameters["run"])
    return "-".join(["evaluate", f"v{evaluation.EVAL_VERSION}", parameters.get("run_id") or rt.run_id, rt.epoch,
                     parameters["checkpoint"].checkpoint_id, parameters["dataset"],
                     evaluation.eval_config_hash(rt.cfg, parameters["dataset"])])


@task(name="evaluate", cache_key_fn=_key, persist_result=True)
def evaluate(run: RunHandle, checkpoint: Checkpoint, dataset: str, run_id: str | None = None,
             step: int | None = None) -> dict:
    """Evaluate `checkpoint` on `dataset`; rows go to `evals` / `eval_samples`; returns the metrics."""
    return evaluation.evaluate(runtime_of(run), checkpoint, dataset, run_id=run_id, step=step)
