"""Contrastive pairs: which groups carry a learning signal (mixed ones) and which (correct, incorrect) rollouts of a
mixed group are analysed together. Pure functions over plain data."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    correct_rollout_id: str
    incorrect_rollout_id: str


def is_mixed(rewards: Sequence[float]) -> bool:
    """A group teaches by contrast only if it holds at least one success and one failure."""
    return any(r > 0 for r in rewards) and any(r <= 0 for r in rewards)


def make_pairs(groups: dict[str, list[tuple[str, float]]], pairs_per_group: int, seed: int,
               strategy: str = "random") -> list[Pair]:
    """Contrastive (y+, y-) pairs from mixed groups.

    groups: prompt_id -> [(rollout_id, reward)] in sample order. `random` draws `pairs_per_group`
    distinct (correct, incorrect) combinations per group with a seeded RNG (the paper does not say
    how pairs are chosen); `all` takes every combination; `disjoint` matches successes and failures
    one-to-one so no rollout is used twice.
    """
    pairs: list[Pair] = []
    for prompt_id in sorted(groups):
        members = groups[prompt_id]
        correct = [rid for rid, r in members if r > 0]
        wrong = [rid for rid, r in members if r <= 0]
        if not correct or not wrong:
            continue
        rng = random.Random(f"{seed}:{prompt_id}")
        if strategy == "all":
            chosen = [(c, w) for c in correct for w in wrong]
        elif strategy == "disjoint":
            c, w = correct[:], wrong[:]
            rng.shuffle(c)
            rng.shuffle(w)
            chosen = list(zip(c, w))[:pairs_per_group] if pairs_per_group > 0 else list(zip(c, w))
        elif strategy == "random":
            combos = [(c, w) for c in correct for w in wrong]
            chosen = rng.sample(combos, min(pairs_per_group, len(combos)))
        else:
            raise ValueError(f"unknown pairing strategy {strategy!r}; one of random, all, disjoint")
        pairs += [Pair(prompt_id, c, w) for c, w in chosen]
    return pairs
