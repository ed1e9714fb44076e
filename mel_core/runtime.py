"""Process-level state of a campaign: config, store, problems, and the one loaded policy + engine.

A Prefect task boundary must never mean reloading weights, so the policy and the engine live here,
built once per process and moved between versions by :meth:`Runtime.ensure_version`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from mel_core import config as config_mod
from mel_core.config import MelConfig
from mel_core.prompts import PromptSet
from mel_core.store import Store, make_id

DB_FILE = "mel.duckdb"


@dataclass(frozen=True)
class Checkpoint:
    """A policy version: its id (the lineage key) and where its weights are."""
    checkpoint_id: str
    path: str

    def as_dict(self) -> dict:
        return {"checkpoint_id": self.checkpoint_id, "path": self.path}


def derive_seed(*parts) -> int:
    """Independent, reproducible seeds per (run seed, step, stage, ...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:6], "big")


class Runtime:
    def __init__(self, cfg: MelConfig):
        self.cfg = cfg
        self.config_hash = config_mod.config_hash(cfg)
        self.run_id = make_id("run", cfg.run.name, self.config_hash)
        self.run_dir = Path(cfg.run.root_dir).resolve() / cfg.run.name
        self.checkpoint_dir = self.run_dir / "checkpoints" / self.config_hash
        self.store = Store(self.run_dir / DB_FILE)
        self.prompts = PromptSet.load(cfg.prompts.dir)
        self._policy = None
        self._engine = None
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)

    @cached_property
    def epoch(self) -> str:
        return self.store.epoch

    @cached_property
    def train_problems(self):
        from mel_core.data import load_problems
        return load_problems(self.cfg.data, split="train")

    @cached_property
    def reward_kind(self) -> str:
        from mel_core.verify import reward_kind_for_source
        return reward_kind_for_source(self.cfg.data.source)

    def step_problems(self, step: int):
        """The B problems of a step: a seeded permutation of the training split, cycled."""
        problems = self.train_problems
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "order")))
        B = self.cfg.sampling.prompts_per_step
        return [problems[int(order[(step * B + i) % len(problems)])] for i in range(B)]

    def model_input(self, text: str) -> str:
        """A rendered prompt as the model reads it: inside its chat template when `prompts.chat_template`.

        What is stored as a record's prompt text is this string, so the update trains on exactly the
        context the generation saw.
        """
        p = self.cfg.prompts
        tokenizer = self.policy.tokenizer
        if p.chat_template and not getattr(tokenizer, "chat_template", None):
            raise config_mod.ConfigError(f"config key 'prompts.chat_template': the tokenizer of "
                                         f"{self.cfg.model.name_or_path} has no chat template")
        return PromptSet.to_model_input(text, tokenizer, p.chat_template, **p.chat_template_kwargs)

    # --------------------------------------------------------------------- the loaded policy

    def ensure_version(self, ckpt: Checkpoint) -> None:
        """Load the policy on first use; afterwards move it to `ckpt` in place if it is elsewhere."""
        from mel_core.engines.hf import HFEngine
        from mel_core.policy import Policy

        if self._policy is None:
            # A LoRA checkpoint holds adapters only: build on the base model, then load them.
            from mel_core.stages import base_checkpoint
            self._policy = Policy(self.cfg, base_checkpoint(self).path if self.cfg.model.lora.enabled else ckpt.path)
            self._engine = HFEngine(self._policy.model, self._policy.tokenizer,
                                    loader=self._policy.load_checkpoint, progress=True)  # bars on a TTY only
            self._engine.version = ckpt.checkpoint_id
            if (Path(ckpt.path) / "optimizer.pt").exists() or self.cfg.model.lora.enabled:
                self._policy.load_checkpoint(ckpt.path)
        self._engine.load_version(ckpt.checkpoint_id, ckpt.path)

    @property
    def policy(self):
        if self._policy is None:
            raise RuntimeError("policy not loaded: call ensure_version first")
        return self._policy

    @property
    def engine(self):
        if self._engine is None:
            raise RuntimeError("engine not loaded: call ensure_version first")
        return self._engine


_RUNTIMES: dict[str, Runtime] = {}
# Flows and tasks receive the config as a dict and ask for its runtime several times per stage (cache
# key, result storage, retry policy, body); rebuilding a validated config from the dict costs ~0.1 s
# each time, so a dict is looked up by its JSON text first.
_RUNTIMES_BY_DICT: dict[tuple[str, str], Runtime] = {}


def get_runtime(cfg: MelConfig | dict) -> Runtime:
    """The process's runtime for this config (built once)."""
    if isinstance(cfg, dict):
        text_key = (json.dumps(cfg, sort_keys=True, default=str), str(Path(cfg["run"]["root_dir"]).resolve()))
        rt = _RUNTIMES_BY_DICT.get(text_key)
        if rt is None:
            rt = _RUNTIMES_BY_DICT[text_key] = get_runtime(config_mod.from_dict(cfg))
        return rt
    key = config_mod.config_hash(cfg, exclude=()) + str(Path(cfg.run.root_dir).resolve())
    rt = _RUNTIMES.get(key)
    if rt is None:
        rt = _RUNTIMES[key] = Runtime(cfg)
    return rt


def clear_runtimes() -> None:
    _RUNTIMES.clear()
    _RUNTIMES_BY_DICT.clear()
