"""One MEL training step as a Prefect DAG (paper §3, docs/DESIGN.md "The algorithm"):

    sample -> verify -> pair -> diagnose -> abstract -> replay -> update

Each stage is a cached task keyed by ids; each hands the next a small manifest, never tensors.
"""

from __future__ import annotations

from prefect import flow

from mel_core.runtime import get_runtime
from mel_core.stage_names import STAGES
from tasks.common import configured
from tasks.stages import STAGE_TASKS


@flow(name="mel-iteration", flow_run_name="step-{step}", log_prints=True)
def iteration(config: dict, step: int, checkpoint: dict) -> dict:
    """One step from policy version `checkpoint`; returns the next checkpoint's manifest."""
    cfg = get_runtime(config).cfg  # the process's runtime: validated once, not per step
    sample, verify, pair, diagnose, abstract, replay, update = (
        configured(STAGE_TASKS[name], name, config) for name in STAGES)

    # 1-2. G rollouts per prompt from pi_old, scored by a verifiable reward.
    rollouts = sample(config, step, checkpoint)
    rewards = verify(config, step, checkpoint, upstream=rollouts)
    experience = rewards
    if cfg.experience.enabled:
        # 3. Contrast a correct and an incorrect rollout of the same (mixed) group.
        pairs = pair(config, step, checkpoint, upstream=rewards)
        # 4-5. The policy locates the bifurcation point, critiques, and abstracts If/Then heuristics.
        analyses = diagnose(config, step, checkpoint, upstream=pairs)
        heuristics = abstract(config, step, checkpoint, upstream=analyses)
        # 6. Keep a meta-experience only if a replay with it in context solves the problem.
        experience = replay(config, step, checkpoint, upstream=heuristics)
    # 7. theta <- theta - lr * grad(L_RL + lambda * L_NLL over the accepted meta-experience).
    return update(config, step, checkpoint, upstream=experience)
