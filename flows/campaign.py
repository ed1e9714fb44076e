"""A MEL campaign: warm start (or load) the policy, run N iterations, evaluate held-out accuracy at the
base, every eval.every_n_steps steps and the last step (if eval.every_n_steps > 0), summarise. A fork
(run.fork, `mel run --fork RUN@STEP`) starts from its parent's checkpoint of that step and runs steps
STEP+1 .. run.steps.

Each step's metrics and stage seconds and each evaluation also go to the trackers of logging.report_to
(mel_core.study.tracking), and the end of the campaign publishes its report's link and a summary artifact. The
campaign's flow run id is in the run lock's record: a campaign that takes the lock over from a dead one marks
the dead one's flow runs Crashed (tasks/flow_runs.py).

Every stage is cached by ids, so running the same campaign again — after a crash, or with more
steps — reuses what finished and continues from the first unfinished stage.
"""

from __future__ import annotations

from prefect import flow, tags
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.evaluate_checkpoint import evaluate_if_due
from flows.iteration import iteration
from flows.workers import generation_workers
from mel_core.config import from_dict, to_dict
from mel_core.run import retention
from mel_core.run.executions import register_run
from mel_core.run.lock import run_lock
from mel_core.run.refs import RunRef
from mel_core.step.runtime import get_runtime, run_dir_of
from mel_core.step.stages import experience_step
from mel_core.study.evaluation import is_due
from mel_core.study.report import write_report
from mel_core.study.summary import NO_SIGNAL_STEPS, format_step, no_signal_warning, step_summary
from mel_core.study.tracking import Tracking
from tasks.artifacts import publish_campaign_summary, publish_report_link, publish_step
from tasks.common import configured
from tasks.flow_runs import crash_orphans, tag_this_flow_run, this_flow_run
from tasks.warm_start import warm_start


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


@flow(name="mel-campaign", flow_run_name="{config[run][name]}")
def campaign(config: dict) -> dict:
    """`config` is a plain dict (mel_core.config.to_dict; what a deployment passes): validated once here, before
    any work starts; everything below takes the runtime's handle."""
    cfg = from_dict(config)
    # One campaign per run directory, before its first record; the lock's record names this flow run for
    # the campaign that takes over if this process dies.
    with run_lock(run_dir_of(cfg), log=announce, extra={"prefect": this_flow_run()},
                  on_takeover=crash_dead_flow_runs):
        return _campaign(get_runtime(cfg))


def crash_dead_flow_runs(dead: dict, me: dict) -> None:
    """The flow runs a dead campaign process left unfinished: Crashed, naming this flow run. A failure here is
    announced, not raised: the UI's bookkeeping never stops a campaign."""
    recorded = dead.get("prefect") or {}
    if not recorded.get("flow_run_id"):
        return  # a campaign from before flow runs were recorded, or one run outside a flow
    try:
        marked = crash_orphans(dead, me)
    except Exception as e:
        announce(f"mel: could not mark the dead campaign's flow runs Crashed: {type(e).__name__}: "
                 f"{(str(e).splitlines() or [''])[0][:200]}")
        return
    if marked is None:
        announce(f"mel: the dead campaign's flow run {recorded['flow_run_id']} is not on this Prefect API "
                 f"(it ran on {recorded.get('api_url')}); it stays as it was there")
    elif marked:
        announce(f"mel: marked Crashed what the dead campaign left unfinished: {', '.join(marked)}")


def _settle_after_failure(rt) -> None:
    """A campaign that fails with a checkpoint still being written keeps it if it can: the write is waited for and
    its rows committed, so the rerun need not recompute that update. Its own failure is announced, never raised:
    the error that stopped the campaign is the one to report."""
    try:
        rt.settle_saves()
        rt.store.publish()
    except BaseException as e:
        announce(f"mel: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")


def run_tags(rt) -> list[str]:
    """What a campaign's flow runs are tagged with, to filter them in the UI and `prefect flow-run ls`: the run's name,
    id and seed (and, in `mel compare`, its arm: flows/compare.py)."""
    return [f"run:{rt.cfg.run.name}", f"run_id:{rt.run_id}", f"seed:{rt.cfg.run.seed}"]


def _campaign(rt) -> dict:
    rt.train_problems  # loaded first: a missing, malformed or empty dataset fails here, before any work
    tag_this_flow_run(run_tags(rt))  # the run id exists only now: the campaign's flow run gets its tags here
    with tags(*run_tags(rt)):  # and every step's and evaluation's flow run and task run as they are created
        return _campaign_tagged(rt)


def _campaign_tagged(rt) -> dict:
    # A fork starts from its parent's checkpoint: nothing to build.
    base = rt.start_checkpoint if rt.cfg.run.fork.run_id else configured(warm_start, rt.handle)(rt.handle)
    register_run(rt, base)
    with generation_workers(rt):  # orchestration.runner: where the generation runs, for the whole campaign
        rt.ensure_version(base)
        rt.usable_problems  # problems that do not fit the context are refused (or skipped) here, before step 1
        return _steps(rt, base)


def _steps(rt, checkpoint) -> dict:
    cfg = rt.cfg
    # A resumed campaign walks its finished steps again (cache hits): the tracking ledger logs each one once.
    tracking = Tracking(cfg.logging, rt.run_id, rt.run_dir)
    finished = False
    summaries, unreported, cached = [], [], set()

    def report_committed() -> None:
        """Announce, publish and log each step once its records are all committed: with run.async_save, step t's
        update rows commit when step t+1 samples (its checkpoint was being written meanwhile)."""
        while unreported and unreported[0] != rt.saving_step:
            step = unreported.pop(0)
            summaries.append(step_summary(rt.store, rt.run_id, step, experience_step(rt, step)))
            announce(format_step(summaries[-1]) + (" | cached" if step in cached else ""))
            publish_step(rt, step, summaries[-1])
            tracking.log_step(summaries[-1])
            no_signal = no_signal_warning(summaries, min(NO_SIGNAL_STEPS, cfg.run.steps - rt.start_step))
            if no_signal:
                announce(no_signal)

    try:
        tracking.log_config(to_dict(cfg))
        # held-out accuracy of the starting policy (a fork's: its parent's checkpoint, at the parent's step)
        evals = evaluate_if_due(rt, rt.start_step, checkpoint, announce)
        tracking.log_evals(evals)
        with without_flow_heartbeat():
            for step in range(rt.start_step + 1, cfg.run.steps + 1):  # a fork's step numbers continue its parent's
                # where it is now (a cached result of an earlier process names the directory it had then); checked
                # where it is loaded, so a finished step whose checkpoint was pruned is walked past
                executed = rt.stage_executions
                checkpoint = rt.locate(iteration(rt.handle, step, checkpoint), strict=False)
                if rt.stage_executions == executed:  # every stage a cache hit: the step finished in an earlier process
                    cached.add(step)
                unreported.append(step)
                if step == cfg.run.steps or is_due(cfg, step):
                    rt.settle_saves()  # the campaign's last checkpoint, or one about to be evaluated: on disk first
                    rt.store.publish()  # and its rows in the snapshot readers (and the report) see
                report_committed()
                due = evaluate_if_due(rt, step, checkpoint, announce)  # every eval.every_n_steps, and the last
                tracking.log_evals(due)
                evals += due
                pruned = retention.prune(rt)  # run.keep_checkpoints, once the step's checkpoint is evaluated
                if pruned:
                    announce(pruned.line(cfg))
        finished = True
    except BaseException:
        _settle_after_failure(rt)
        raise
    finally:
        tracking.close(ok=finished)

    if cfg.logging.report_at_end:
        publish_report_link(rt, write_report(RunRef(rt.store.path, run_id=rt.run_id)))
    publish_campaign_summary(rt, summaries, evals)
    return {"run_id": rt.run_id, "run_dir": str(rt.run_dir), "db": str(rt.store.path),
            "final_checkpoint": checkpoint, "steps": summaries, "evals": evals}
