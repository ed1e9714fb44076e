"""Solving a batch of prompts and scoring every solution: what replays and evaluations share.

One engine call generates `params.n` solutions per prompt (batched as the engine sees fit), one verifier call
scores them all; the result keeps each solution with its prompt's index and its sample index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mel_core.engines.base import Completion, SamplingParams


@dataclass(frozen=True)
class Solved:
    prompt_index: int
    sample_index: int
    completion: Completion
    verdict: object  # mel_core.verify.Verdict: reward, extracted answer, reason


def solve_and_verify(engine, verifier, prompts: Sequence[str], golds: Sequence[str], params: SamplingParams,
                     desc: str = "") -> list[Solved]:
    """[P * n] solutions in prompt order, each with its verdict against its prompt's gold answer."""
    outs = engine.generate(list(prompts), params, desc=desc)
    flat = [(j, i, c) for j, cs in enumerate(outs) for i, c in enumerate(cs)]
    verdicts = verifier.verify([c.text for *_, c in flat], [golds[j] for j, *_ in flat],
                               [c.finish_reason for *_, c in flat])
    return [Solved(j, i, c, v) for (j, i, c), v in zip(flat, verdicts)]
