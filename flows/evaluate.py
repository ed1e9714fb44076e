"""Evaluate one policy version on a list of datasets: greedy Pass@1 and Avg@k / Pass@k at eval.temperature.

Meta-experience is never in context here [P]: the policy reads the plain solve prompt. Each dataset is a
cached task keyed by (run, checkpoint, dataset, eval config), so evaluating again is free.
"""

from __future__ import annotations

from typing import Callable

from prefect import flow

from flows.workers import generation_workers
from mel_core.config import from_dict
from mel_core.evaluate import format_eval, is_due
from mel_core.runtime import get_runtime
from tasks.common import configured
from tasks.evaluate import evaluate_task


@flow(name="mel-evaluate")
def evaluate_checkpoint(config: dict, checkpoint: dict, datasets: list[str] | None = None,
                        run_id: str | None = None, step: int | None = None) -> list[dict]:
    """`checkpoint` = {checkpoint_id, path}; `datasets` default to eval.datasets; `run_id` is the run that owns
    the checkpoint (default: the config's run). Returns one metrics manifest per dataset."""
    cfg = from_dict(config)
    evaluate = configured(evaluate_task, "evaluate", config)
    with generation_workers(get_runtime(cfg)):  # started here for `mel eval`; a campaign's already run
        return [evaluate(config, checkpoint, dataset, run_id=run_id, step=step)
                for dataset in (datasets or cfg.eval.datasets)]


def evaluate_if_due(config: dict, step: int, checkpoint: dict, announce: Callable[[str], None] = print) -> list[dict]:
    """A campaign's held-out evaluation: the base (step 0), every eval.every_n_steps steps, and the last step."""
    if not is_due(from_dict(config), step):
        return []
    results = evaluate_checkpoint(config, checkpoint, step=step)
    for r in results:
        announce(format_eval(r))
    return results
