"""The seven stages of a step as Prefect tasks, one each.

Each runs its body of ``mel_core.step.stages`` on the process's runtime through the run's bookkeeping (one
``stage_runs`` row per execution) and returns the body's small manifest. Every task takes the run, the step and
the policy version the step starts from: together they are the task's cache key (``stage_cache_key``), so a new
flow run of the same campaign reuses every finished stage — the update excepted, which asks the store instead (see
its task). The stages that generate or train are given that
version; the others read only the step's records.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from prefect import Task, task

from mel_core.model.checkpoints import Checkpoint
from mel_core.step import stages
from mel_core.step.runtime import RunHandle, runtime_of
from tasks.common import configured, run_stage, stage_cache_key


@task(name="sample", cache_key_fn=stage_cache_key("sample"), persist_result=True)
def sample(run: RunHandle, step: int, checkpoint: Checkpoint) -> dict:
    """B prompts x G rollouts from pi_old, one batched engine call."""
    return run_stage(run, "sample", step, stages.sample, checkpoint)


@task(name="verify", cache_key_fn=stage_cache_key("verify"), persist_result=True)
def verify(run: RunHandle, step: int, checkpoint: Checkpoint) -> dict:
    """A verifiable reward per rollout."""
    return run_stage(run, "verify", step, stages.verify)


@task(name="pair", cache_key_fn=stage_cache_key("pair"), persist_result=True)
def pair(run: RunHandle, step: int, checkpoint: Checkpoint) -> dict:
    """Contrastive (correct, incorrect) pairs from mixed groups."""
    return run_stage(run, "pair", step, stages.pair)


@task(name="diagnose", cache_key_fn=stage_cache_key("diagnose"), persist_result=True)
def diagnose(run: RunHandle, step: int, checkpoint: Checkpoint) -> dict:
    """The policy finds the bifurcation point and critiques, one batched call over the pairs."""
    return run_stage(run, "diagnose", step, stages.diagnose, checkpoint)


@task(name="abstract", cache_key_fn=stage_cache_key("abstract"), persist_result=True)
def abstract(run: RunHandle, step: int, checkpoint: Checkpoint) -> dict:
    """If/Then heuristics without problem specifics, and M*, the text that is trained on."""
    return run_stage(run, "abstract", step, stages.abstract, checkpoint)


@task(name="replay", cache_key_fn=stage_cache_key("replay"), persist_result=True)
def replay(run: RunHandle, step: int, checkpoint: Checkpoint) -> dict:
    """Each question re-solved with its M in context; M is kept if the replay verifies."""
    return run_stage(run, "replay", step, stages.replay, checkpoint)


# refresh_cache: the update always runs and the store decides. Its task can finish before its checkpoint is on disk
# (run.async_save writes it in the background), so a cached result could name a checkpoint whose save died with
# its process. The result is still stored under its key.
@task(name="update", cache_key_fn=stage_cache_key("update"), persist_result=True, refresh_cache=True)
def update(run: RunHandle, step: int, checkpoint: Checkpoint) -> dict:
    """One optimizer step on L_RL + lambda * L_NLL; its manifest names the new checkpoint. An update whose rows are
    committed returns them as recorded, with no execution recorded (as a cache hit of another stage)."""
    done = stages.recorded_update(runtime_of(run), step, checkpoint)
    return done if done is not None else run_stage(run, "update", step, stages.update, checkpoint)


@dataclass(frozen=True)
class StageTasks:
    """The seven tasks with one campaign's result storage and retry policy (tasks.common.configured)."""
    sample: Task
    verify: Task
    pair: Task
    diagnose: Task
    abstract: Task
    replay: Task
    update: Task


@lru_cache(maxsize=None)
def for_run(run: RunHandle) -> StageTasks:
    return StageTasks(sample=configured(sample, run), verify=configured(verify, run), pair=configured(pair, run),
                      diagnose=configured(diagnose, run), abstract=configured(abstract, run),
                      replay=configured(replay, run), update=configured(update, run))
