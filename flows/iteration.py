"""One MEL training step as a Prefect DAG (paper §3, docs/DESIGN.md "The algorithm"):

    sample -> verify -> pair -> diagnose -> abstract -> replay -> update

With orchestration.overlap the analyses of step t-1's pairs are generated in step t's rollout batch, so a step reads

    sample (+ diagnose of t-1) -> verify -> pair -> abstract (t-1) -> replay (t-1) -> update (L_RL of t, L_NLL of t-1)

Each stage is a cached task keyed by ids; each reads its inputs from the store and hands the next a small manifest,
never tensors. `wait_for` draws the DAG's edges in the UI (the data itself flows through the store).
"""

from __future__ import annotations

from prefect import flow

from mel_core.config import step_stages
from mel_core.model.checkpoints import Checkpoint
from mel_core.step.runtime import RunHandle, runtime_of
from mel_core.step.stages import experience_step
from tasks import stage_tasks


@flow(name="mel-iteration", flow_run_name="{run.name}/step-{step}", log_prints=True, validate_parameters=False)
def iteration(run: RunHandle, step: int, checkpoint: Checkpoint) -> Checkpoint:
    """One step from policy version `checkpoint`; returns the policy version it trained."""
    task = stage_tasks.for_run(run)  # each stage's task with this campaign's result storage and retry policy
    rt = runtime_of(run)

    # 1-2. G rollouts per prompt from pi_old, scored by a verifiable reward.
    rollouts = task.sample(run, step, checkpoint)
    rewards = task.verify(run, step, checkpoint, wait_for=[rollouts])
    experience = [rewards]
    stages = step_stages(rt.cfg)  # GRPO: no MEL stage; count-matched grpo+sft: pair only
    if "pair" in stages:
        # 3. Contrast a correct and an incorrect rollout of the same (mixed) group.
        pairs = task.pair(run, step, checkpoint, wait_for=[rewards])
        experience = [pairs]
    if "diagnose" in stages:
        analysed = experience_step(rt, step)  # overlap: step t-1
        # 4-5. The policy locates the bifurcation point, critiques, and abstracts If/Then heuristics (overlap: the
        # analyses of step t-1's pairs were generated in this step's rollout batch).
        analyses = task.diagnose(run, step, checkpoint, wait_for=[pairs]) if analysed == step else rollouts
        if analysed > rt.start_step:  # overlap: the campaign's first step has no earlier pairs
            heuristics = task.abstract(run, analysed, checkpoint, wait_for=[analyses])
            # 6. Keep a meta-experience only if a replay with it in context solves the problem.
            experience = [task.replay(run, analysed, checkpoint, wait_for=[heuristics])]
    # 7. theta <- theta - lr * grad(L_RL + lambda * L_NLL over the accepted meta-experience).
    return task.update(run, step, checkpoint, wait_for=experience)["checkpoint"]
