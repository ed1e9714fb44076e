"""Generation fanned out to workers, chunk by chunk (``orchestration.runner: ray``).

A generate call is cut into the chunks the HF engine would make (engines/base.py `chunked`: same
prompts, same order, seed ``params.seed + index``), the chunks go to workers that each keep their own
engine loaded (engines/worker.py), and the completions come back in order. A worker generates a chunk
exactly as the flow process's own HF engine would, so a campaign on N workers writes the records a
single-process campaign writes with the same seeds (same threads per process; tests/test_scale.py).

The workers only generate: they return completions, and the flow process, which alone holds the
DuckDB file, writes every record. How chunks reach the workers is a dispatch function's, which the
orchestration layer gives the engine (flows/workers.py: Prefect tasks on prefect-ray's task runner); this
module knows neither Ray nor Prefect.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from mel_core.model.engines.base import Chunk, Completion, SamplingParams, chunked, regroup


@dataclass
class ChunkJob:
    """What a worker needs to generate one chunk: the policy version (id and checkpoint path; with LoRA
    also the base model the adapter applies to), the chunk and the sampling parameters. Plain data, so
    it travels to another process or machine."""
    version: str
    path: str
    chunk: Chunk
    params: SamplingParams
    base_path: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChunkJob":
        return cls(d["version"], d["path"], Chunk(**d["chunk"]), SamplingParams(**d["params"]), d.get("base_path"))


Dispatch = Callable[[list[ChunkJob]], list[list[Completion]]]

class ShardedEngine:
    def __init__(self, dispatch: Dispatch, *, max_batch_sequences: int = 256, base_path: str | None = None):
        self.dispatch = dispatch
        self.max_batch_sequences = max_batch_sequences
        self.base_path = base_path
        self.version: str | None = None
        self.path: str | None = None

    def load_version(self, version: str, path: str) -> None:
        """Workers move to a version when a job names it; here the version and its path are only noted."""
        self.version, self.path = version, path

    def generate(self, prompts: Sequence[str], params: SamplingParams, desc: str = "") -> list[list[Completion]]:
        if self.version is None or self.path is None:
            raise RuntimeError("no policy version to generate from: call load_version first")
        if not prompts:
            return []
        jobs = [ChunkJob(self.version, self.path, chunk, params, self.base_path)
                for chunk in chunked(prompts, params.n, self.max_batch_sequences)]
        out = [c for completions in self.dispatch(jobs) for c in completions]
        return regroup(out, len(prompts), params.n)
