"""A MEL campaign: warm start (or load) the policy, run N iterations, evaluate held-out accuracy at the
base, every eval.every_n_steps steps and the last step (if eval.every_n_steps > 0), summarise. A fork
(run.fork, `mel run --fork RUN@STEP`) starts from its parent's checkpoint of that step and runs steps
STEP+1 .. run.steps.

Every stage is cached by ids, so running the same campaign again — after a crash, or with more
steps — reuses what finished and continues from the first unfinished stage.
"""

from __future__ import annotations

from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.evaluate import evaluate_if_due
from flows.iteration import iteration
from flows.workers import generation_workers
from mel_core.bookkeeping import register_run
from mel_core.config import from_dict
from mel_core.runlock import run_lock
from mel_core.runtime import Checkpoint, get_runtime, run_dir_of
from mel_core.summary import format_step, step_summary
from tasks.artifacts import publish_step
from tasks.common import configured
from tasks.warm_start import warm_start_task


def without_flow_heartbeat():
    """Flow runs started inside this context send no Prefect flow-run heartbeat. The campaign's own
    heartbeat already marks the run alive; a step's would only delay it: at its end a flow run joins
    its heartbeat thread, which sleeps in 1 s slices (Prefect 3.8.8), ~0.5 s per step on average
    (docs/BENCHMARKS.md, orchestration.py)."""
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def announce(line: str) -> None:
    """To the terminal and to the flow run's log in the UI."""
    from prefect.logging import get_run_logger
    print(line, flush=True)
    get_run_logger().info(line)


@flow(name="mel-campaign")
def campaign(config: dict) -> dict:
    """`config` is a plain dict (mel_core.config.to_dict); it is validated before any work starts."""
    cfg = from_dict(config)
    with run_lock(run_dir_of(cfg), log=announce):  # one campaign per run directory, before its first record
        return _campaign(config, cfg)


def _campaign(config: dict, cfg) -> dict:
    rt = get_runtime(cfg)
    rt.train_problems  # loaded first: a missing, malformed or empty dataset fails here, before any work

    if cfg.run.fork.run_id:  # a fork starts from its parent's checkpoint: nothing to build
        checkpoint = rt.start_checkpoint.as_dict()
    else:
        checkpoint = configured(warm_start_task, "warm_start", config)(config)
    base = Checkpoint(checkpoint["checkpoint_id"], checkpoint["path"])
    register_run(rt, base)
    with generation_workers(rt):  # orchestration.runner: where the generation runs, for the whole campaign
        rt.ensure_version(base)
        rt.usable_problems  # problems that do not fit the context are refused (or skipped) here, before step 1
        return _steps(config, cfg, rt, checkpoint)


def _steps(config: dict, cfg, rt, checkpoint: dict) -> dict:
    # held-out accuracy of the starting policy (a fork's: its parent's checkpoint, at the parent's step)
    evals = evaluate_if_due(config, rt.start_step, checkpoint, announce)
    summaries = []
    with without_flow_heartbeat():
        for step in range(rt.start_step + 1, cfg.run.steps + 1):  # a fork's step numbers continue its parent's
            checkpoint = iteration(config, step, checkpoint)
            summaries.append(step_summary(rt.store, rt.run_id, step))
            announce(format_step(summaries[-1]))
            publish_step(rt, step, summaries[-1])
            evals += evaluate_if_due(config, step, checkpoint, announce)  # every eval.every_n_steps, and the last

    return {"run_id": rt.run_id, "run_dir": str(rt.run_dir), "db": str(rt.store.path),
            "final_checkpoint": checkpoint, "steps": summaries, "evals": evals}
