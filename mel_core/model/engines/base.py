"""The generation-engine interface: what the pipeline needs from HF, vLLM or any other backend.

Every generation of a step (rollouts, analyses, replays) is one call to :meth:`Engine.generate`
with all its prompts, so the backend batches as it sees fit. The engine serves one policy version
at a time and is told to move to another with :meth:`Engine.load_version`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    logprobs: bool = False  # also return each token's log-prob under the sampling distribution (vLLM engine)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos) | "length"
    logprobs: list[float] | None = field(default=None, repr=False)


class Engine(Protocol):
    """An engine may also set ``reads_checkpoints = False`` when its :meth:`load_version` never reads `path` (its
    weights come from elsewhere): checkpoints may then be written in the background while it generates from a new
    version (run.async_save; mel_core.step.runtime.Runtime.saves_in_background). Without it, an engine handed in with
    ``Runtime.use_engine`` is taken to read the directory, which is then written before it moves."""
    version: str | None

    def generate(self, prompts: Sequence[str], params: SamplingParams, desc: str = "") -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order."""

    def load_version(self, version: str, path: str) -> None:
        """Serve the policy saved at `path` from now on (no-op if already serving `version`)."""


Request = tuple[Sequence[str], SamplingParams]


def generate_together(engine, requests: Sequence[Request], desc: str = "") -> list[list[list[Completion]]]:
    """Several generations — each its prompts and its own sampling parameters — in one engine batch where the engine
    can (its ``generate_many``: vLLM schedules every sequence together; the HF engine pads them into shared chunks),
    else one call each. Per request, what ``generate`` returns (orchestration.overlap: a step's rollouts and the
    previous step's analyses share one batch)."""
    many = getattr(engine, "generate_many", None)
    if many is not None:
        return many(requests, desc=desc)
    return [engine.generate(prompts, params, desc=desc) for prompts, params in requests]


@dataclass
class Chunk:
    """One unit of generation: a slice of the expanded prompt list ([P*n], each prompt n times in a row),
    sampled with seed ``params.seed + index``. Engines that cut a call into the same chunks and seed them
    the same way produce the same completions, wherever each chunk runs (see engines/sharded.py)."""
    index: int
    prompts: list[str]


def chunked(prompts: Sequence[str], n: int, max_sequences: int) -> list[Chunk]:
    expanded = [p for p in prompts for _ in range(n)]  # [P*n]
    return [Chunk(i, expanded[start:start + max_sequences])
            for i, start in enumerate(range(0, len(expanded), max_sequences))]


def regroup(completions: Sequence[Completion], num_prompts: int, n: int) -> list[list[Completion]]:
    """[P*n] completions in prompt order -> P groups of n."""
    return [list(completions[i * n:(i + 1) * n]) for i in range(num_prompts)]

