"""The replay filter: a meta-experience is kept only if a replay with it in context solves the problem (paper §3),
and the share of candidates kept."""

from __future__ import annotations

from typing import Sequence


def accept(replay_rewards: Sequence[float], min_correct: int) -> bool:
    """Paper rule: kept only if the replay with M in context solves the problem (default 1 of 1)."""
    return sum(1 for r in replay_rewards if r > 0) >= min_correct


def retention_ratio(accepted: int, candidates: int) -> float:
    """Accepted / candidate meta-experiences (paper: ~0.2-0.4 at 4B, up to ~0.75 at 14B)."""
    return accepted / candidates if candidates else 0.0
