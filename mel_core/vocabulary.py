"""The names a config chooses among, in one leaf: the config validates against them and the modules that
implement each name import them from here, so the config never imports what it configures.

A test (tests/test_config.py) checks that each implementation covers its names exactly: the loss registries,
the worlds, the stage versions.
"""

from __future__ import annotations

import importlib.util

# A MEL step, in order (docs/DESIGN.md §2), and the stage that builds the starting policy once per campaign.
STAGES = ("sample", "verify", "pair", "diagnose", "abstract", "replay", "update")
ALL_STAGES = ("warm_start",) + STAGES

# Estimators and policy losses registered by name in mel_core.algorithm.losses.
ADVANTAGES = ("grpo", "dr_grpo", "batch", "reinforce_pp", "rft")
POLICY_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")

# Rewards: how a text is scored (math answers or an embedded world's answer line), where a math answer is read,
# and what a completion cut at the length limit scores.
REWARD_KINDS = ("synthetic", "math")
EXTRACTIONS = ("boxed_last", "math_verify")
TRUNCATED_REWARDS = ("zero", "verify")

# The meta-experience: what a replay has in context, what happens to a retrospective context that does not fit.
REPLAY_CONTEXTS = ("full", "heuristics")
LONG_CONTEXT_MODES = ("shorten", "skip")
ANALYSTS = ("policy", "oracle", "mismatched")  # and model:<path>
# The NLL term: what it trains on, which parts of M* carry loss (mel_core.algorithm.nll_targets), how it is averaged.
NLL_TARGETS = ("meta_experience", "correct_rollout", "accepted_replay", "reference_solution")
NLL_PARTS = ("all", "heuristics", "critique+heuristics")
NLL_NORMALIZATIONS = ("accepted", "batch")

# The embedded worlds, and the rules world's exception rules (the ones a warm start can leave weak).
WORLDS = ("arithmetic", "rules")
RULES_EXCEPTION_RULES = ("skip", "jump", "stay")

# Experiment trackers -> (the module each imports, the pip package that provides it).
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
TRACKERS = tuple(TRACKER_PACKAGES)


def missing_tracker_package(tracker: str) -> str | None:
    """Why `tracker` cannot run here (its package is not installed), or None; the package is not imported."""
    module, package = TRACKER_PACKAGES[tracker]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{tracker} needs the package {package}: pip install {package} (or pip install -e '.[tracking]')"
