"""Evaluate one policy version on a list of datasets: greedy Pass@1 and Avg@k / Pass@k at eval.temperature.

Meta-experience is never in context here [P]: the policy reads the plain solve prompt. Each dataset is a
cached task keyed by (run, checkpoint, dataset, eval config), so evaluating again is free.
"""

from __future__ import annotations

from typing import Callable

from prefect import flow

from flows.workers import generation_workers
from mel_core.model.checkpoints import Checkpoint
from mel_core.step.runtime import RunHandle, Runtime, runtime_of
from mel_core.study.evaluation import format_eval, is_due
from tasks.common import configured
from tasks.evaluate_task import evaluate


@flow(name="mel-evaluate", validate_parameters=False)
def evaluate_checkpoint(run: RunHandle, checkpoint: Checkpoint, datasets: list[str] | None = None,
                        run_id: str | None = None, step: int | None = None) -> list[dict]:
    """`datasets` default to eval.datasets; `run_id` is the run that owns the checkpoint (default: the config's
    run). Returns one metrics manifest per dataset."""
    rt = runtime_of(run)
    task = configured(evaluate, run)
    with generation_workers(rt):  # started here for `mel eval`; a campaign's already run
        return [task(run, checkpoint, dataset, run_id=run_id, step=step) for dataset in (datasets or rt.cfg.eval.datasets)]


def evaluate_if_due(rt: Runtime, step: int, checkpoint: Checkpoint,
                    announce: Callable[[str], None] = print) -> list[dict]:
    """A campaign's held-out evaluation: the base (step 0), every eval.every_n_steps steps, and the last step."""
    if not is_due(rt.cfg, step):
        return []
    results = evaluate_checkpoint(rt.handle, checkpoint, step=step)
    for r in results:
        announce(format_eval(r))
    return results
