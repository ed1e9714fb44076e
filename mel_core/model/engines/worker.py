"""The generation side of a worker process (a Ray worker under ``orchestration.runner: ray``).

A worker keeps one policy and its HF engine loaded between jobs, as the flow process does (the model
is built once per process, never per task), and moves them to the version a job names by loading
that checkpoint's weights — not the optimizer: a worker never trains.
"""

from __future__ import annotations

import json

import torch

from mel_core.model.engines.base import Completion
from mel_core.model.engines.sharded import ChunkJob

# config text -> (policy, engine): one entry per campaign this worker has served.
_LOADED: dict[str, tuple] = {}


def run_chunk(config: dict, job: ChunkJob) -> list[Completion]:
    """Generate `job`'s chunk with the policy version it names, as HFEngine.generate_chunk does in the
    flow process (same chunk, same seed, same model construction)."""
    from mel_core import config as config_mod
    from mel_core.model.engines.hf import HFEngine
    from mel_core.model.policy import Policy

    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _LOADED:
        cfg = config_mod.from_dict(config)
        threads = cfg.orchestration.ray.threads_per_worker or cfg.run.torch_threads
        if threads:
            torch.set_num_threads(threads)
        policy = Policy(cfg, job.base_path or job.path)  # LoRA: the base model, adapters loaded below
        engine = HFEngine(policy.model, policy.tokenizer, loader=policy.load_weights, compute=policy.compute)
        if not job.base_path:
            engine.version = job.version  # built from this version's own weights
        _LOADED[key] = (policy, engine)
    _, engine = _LOADED[key]
    engine.load_version(job.version, job.path)
    return engine.generate_chunk(job.chunk, job.params)
