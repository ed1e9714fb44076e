"""Process-level state of a campaign: config, store, problems, and the one loaded policy + engine.

A Prefect task boundary must never mean reloading weights, so the policy and the engine live here,
built once per process and moved between versions by :meth:`Runtime.ensure_version`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from mel_core import config as config_mod
from mel_core.algorithm.rewards import Verdict
from mel_core.config import MelConfig
from mel_core.ids import derive_seed, make_id
from mel_core.model import async_save
from mel_core.model.checkpoints import (
    Checkpoint,
    MissingCheckpoint,
    has_optimizer_state,
    require_checkpoint_dir,
    resolve_checkpoint_path,
    verify_checkpoint,
)
from mel_core.model.engines.base import Completion, SamplingParams
from mel_core.problems.prompts import PromptSet
from mel_core.store.database import DB_FILE
from mel_core.store.writer import Store
from mel_core.tokens import stop_token_ids

_log = logging.getLogger("mel")


def run_dir_of(cfg: MelConfig) -> Path:
    """The directory of a run: its store, checkpoints, lock and task results."""
    return Path(cfg.run.root_dir).resolve() / cfg.run.name


def problem_place(problem, source: str) -> str:
    """Where a problem is: FILE:LINE for a row of a JSONL file, else its id."""
    return f"{source}:{problem.meta['line']}" if "line" in problem.meta else problem.problem_id


@dataclass(frozen=True)
class Solved:
    """One solution of :meth:`Runtime.solve`: its prompt's index, its sample index, the completion, its verdict."""
    prompt_index: int
    sample_index: int
    completion: Completion
    verdict: Verdict


class Runtime:
    handle: RunHandle  # set by get_runtime, which registers it

    def __init__(self, cfg: MelConfig):
        self.cfg = cfg
        self.stage_executions = 0  # stage bodies run by this process (mel_core.run.executions): a resumed step has none
        self.config_hash = config_mod.config_hash(cfg)
        self.run_id = make_id("run", cfg.run.name, self.config_hash)
        self.run_dir = run_dir_of(cfg)
        self.checkpoint_dir = self.run_dir / "checkpoints" / self.config_hash
        self.prompts = PromptSet.load(cfg.prompts.dir)
        self._policy = None
        self._policy_version: str | None = None  # the checkpoint the policy's weights equal; None = none
        self._engine = None
        self._given_engine = False  # an engine handed in by use_engine, kept instead of the configured one
        self._pending_save: async_save.PendingSave | None = None  # the checkpoint being written in the background
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)

    @cached_property
    def store(self) -> Store:
        """The run's DuckDB store, opened (and verified) on first use: a runtime that only measures a
        checkpoint (mel gate) never creates one."""
        return Store(self.run_dir / DB_FILE)

    @cached_property
    def epoch(self) -> str:
        return self.store.epoch

    # ------------------------------------------------------------------- version 0 of the policy

    @cached_property
    def model_source(self):
        """Where the starting weights come from (mel_core.model.sources): a named model converted once under
        run.cache_dir, a local folder or a hub name, with its provenance. Not for the embedded tiny model."""
        from mel_core.model import sources
        return sources.resolve(self.cfg.model.name_or_path, self.cfg.run.cache_dir)

    @cached_property
    def base_checkpoint(self) -> Checkpoint:
        """Version 0 of the policy: the warm-started tiny model (built once, cached on disk) or a real model."""
        if self.cfg.model.name_or_path == "tiny":
            from mel_core.model import tiny
            path = tiny.ensure_warm_start(self.cfg)
            return Checkpoint(make_id("ckpt", "tiny", tiny.warm_start_key(self.cfg)), str(path))
        return Checkpoint(make_id("ckpt", "base", self.cfg.model.name_or_path), self.model_source.path)

    @property
    def model_provenance(self) -> dict:
        """What the run records of its starting weights (runs.model_json)."""
        if self.cfg.model.name_or_path == "tiny":
            from mel_core.model import tiny
            return {"source": "tiny", "warm_start_key": tiny.warm_start_key(self.cfg), "path": self.base_checkpoint.path}
        return self.model_source.provenance

    @property
    def start_step(self) -> int:
        """The step a campaign's first step follows: 0, or for a fork the parent's step it starts from (step
        numbers continue the parent's)."""
        return self.cfg.run.fork.step if self.cfg.run.fork.run_id else 0

    @cached_property
    def start_checkpoint(self) -> Checkpoint:
        """The policy version a campaign starts from: version 0 (:attr:`base_checkpoint`), or for a fork the
        parent's checkpoint of run.fork.step, with its optimizer state. A LoRA fork still builds on the base model."""
        fork = self.cfg.run.fork
        return Checkpoint(fork.checkpoint_id, fork.checkpoint_path) if fork.run_id else self.base_checkpoint

    @cached_property
    def train_problems(self):
        from mel_core.problems.sources import load_problems
        return load_problems(self.cfg.data, split="train")

    @cached_property
    def reward_kind(self) -> str:
        from mel_core.algorithm.rewards.verifier import reward_kind_for_source
        return reward_kind_for_source(self.cfg.data.source)

    @cached_property
    def analyst_engine(self):
        """experience.analyst: model:<path> — the teacher's own HF engine, on the policy's device, never trained."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mel_core.model.engines.hf import HFEngine
        from mel_core.model.policy import resolve_device

        path = self.cfg.experience.analyst.removeprefix("model:")
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.model.dtype]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(resolve_device(self.cfg.model.device))
        model.eval().requires_grad_(False)
        return HFEngine(model, tokenizer, max_batch_sequences=self.cfg.sampling.chunk_sequences,
                        stop_ids=stop_token_ids(tokenizer, self.uses_chat_template))

    @cached_property
    def verifier(self):
        """The training data's :class:`mel_core.algorithm.rewards.verifier.Verifier` (its reward kind with ``cfg.verify``)."""
        from mel_core.algorithm.rewards.verifier import Verifier
        return Verifier.from_config(self.cfg.verify, self.reward_kind)

    def solve(self, prompts: Sequence[str], golds: Sequence[str], params: SamplingParams, desc: str = "",
              verifier=None, problems: Sequence | None = None) -> list[Solved]:
        """Generate `params.n` solutions per prompt in one engine call and score them all in one verifier call
        (this run's verifier unless another is given): what replays, evaluations and the gate share. [P * n]
        solutions in prompt order, each with its prompt's index, its sample index and its verdict. `problems` (one
        per prompt) is what a reward plug-in is given beside the gold."""
        outs = self.engine.generate(list(prompts), params, desc=desc)
        flat = [(j, i, c) for j, cs in enumerate(outs) for i, c in enumerate(cs)]
        verdicts = (verifier or self.verifier).verify([c.text for *_, c in flat], [golds[j] for j, *_ in flat],
                                                      [c.finish_reason for *_, c in flat],
                                                      None if problems is None else [problems[j] for j, *_ in flat])
        return [Solved(j, i, c, v) for (j, i, c), v in zip(flat, verdicts)]

    @property
    def context_limit(self) -> int:
        """Longest prompt + completion the policy takes: model.max_seq_len, within the model's own window."""
        window = getattr(self.policy.model.config, "max_position_embeddings", None) or self.cfg.model.max_seq_len
        return min(self.cfg.model.max_seq_len, int(window))

    @cached_property
    def usable_problems(self):
        """The training problems whose solve prompt and a whole rollout fit the context (data.too_long decides
        what happens to the others). Needs the policy (its tokenizer): the campaign asks before step 1."""
        problems = self.train_problems
        too_long = self.too_long(problems, self.cfg.sampling.max_new_tokens)
        if not too_long:
            return problems
        where = problem_place(too_long[0][0], self.cfg.data.source)
        if self.cfg.data.too_long == "error" or len(too_long) == len(problems):
            raise self.too_long_error(too_long, len(problems), self.cfg.data.source, "sampling.max_new_tokens",
                                      self.cfg.sampling.max_new_tokens, "set data.too_long=skip")
        _log.warning("data.too_long=skip: %d of %d training problems do not fit the context of %d tokens with "
                     "sampling.max_new_tokens=%d and are left out (first: %s)", len(too_long), len(problems),
                     self.context_limit, self.cfg.sampling.max_new_tokens, where)
        skipped = {id(q) for q, _ in too_long}
        return [q for q in problems if id(q) not in skipped]

    def too_long(self, problems, max_new_tokens: int) -> list[tuple]:
        """(problem, prompt tokens) of every problem whose solve prompt, as the model reads it, and `max_new_tokens`
        do not fit the context: a generation from it would run past the model's window (training or evaluation).
        Needs the policy (its tokenizer and chat template)."""
        texts = [self.model_input(self.prompts.render_solve(p.question)) for p in problems]
        lengths = [len(ids) for ids in self.policy.encode_prompts(texts)]
        budget = self.context_limit - max_new_tokens
        return [(p, n) for p, n in zip(problems, lengths) if n > budget]

    def too_long_error(self, too_long: list[tuple], total: int, source: str, key: str, new_tokens: int, remedy: str):
        """The DataError that refuses `too_long` (from :meth:`too_long`, of `total` problems of `source`, generating
        `new_tokens` per config key `key`): one line naming the first one's file and line, its length, and what would
        make it fit."""
        from mel_core.problems.sources import DataError

        p, n = too_long[0]
        return DataError(f"{problem_place(p, source)}: the solve prompt is {n} tokens; with {key}={new_tokens} it does "
                         f"not fit the context of {self.context_limit} tokens ({len(too_long)} of {total} problems do "
                         f"not): raise model.max_seq_len, shorten {key}, or {remedy}")

    def step_problems(self, step: int):
        """The B problems of a step: a seeded permutation of the (usable) training problems, cycled."""
        problems = self.usable_problems
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "order")))
        B = self.cfg.sampling.prompts_per_step
        return [problems[int(order[(step * B + i) % len(problems)])] for i in range(B)]

    @property
    def uses_chat_template(self) -> bool:
        """prompts.chat_template against the policy's tokenizer: auto uses its template when it has one."""
        mode, has = self.cfg.prompts.chat_template, bool(getattr(self.policy.tokenizer, "chat_template", None))
        if mode == "always" and not has:
            raise config_mod.ConfigError(f"config key 'prompts.chat_template': always, but the tokenizer of "
                                         f"{self.cfg.model.name_or_path} has no chat template")
        return mode == "always" or (mode == "auto" and has)

    @cached_property
    def stop_ids(self) -> list[int]:
        """What ends a completion: eos, and inside a chat template its end-of-turn token (mel_core.tokens)."""
        return stop_token_ids(self.policy.tokenizer, self.uses_chat_template)

    def model_input(self, text: str) -> str:
        """A rendered prompt as the model reads it: inside its chat template per `prompts.chat_template`.

        What is stored as a record's prompt text is this string, so the update trains on exactly the
        context the generation saw.
        """
        return PromptSet.to_model_input(text, self.policy.tokenizer, self.uses_chat_template,
                                        **self.cfg.prompts.chat_template_kwargs)

    # --------------------------------------------------------------------- the loaded policy

    def locate(self, ckpt: Checkpoint, strict: bool = True) -> Checkpoint:
        """`ckpt` with its path where the checkpoint is now (mel_core.model.checkpoints.resolve_checkpoint_path
        against this run's directory): a Checkpoint from a cached task result or a store of a run since copied or
        moved names the original's directory. MissingCheckpoint (permanent, one line naming the run directory) when
        it is nowhere (never read as a hub name) — unless not `strict`: a checkpoint only handed on, not loaded (the
        result of a finished step a resumed campaign walks past; its directory may have been pruned)."""
        path = resolve_checkpoint_path(ckpt.path, self.run_dir)
        if not path.is_absolute():
            return ckpt  # a base model's hub name: transformers downloads it
        writing = self._pending_save is not None and self._pending_save.checkpoint.checkpoint_id == ckpt.checkpoint_id
        if strict and not writing:  # the one being written in the background is there once settled
            if not path.is_dir():
                self._refuse_pruned(ckpt)
            require_checkpoint_dir(ckpt.checkpoint_id, path, self.run_dir)
        return ckpt if str(path) == ckpt.path else Checkpoint(ckpt.checkpoint_id, str(path))

    def _refuse_pruned(self, ckpt: Checkpoint) -> None:
        """MissingCheckpoint in one line saying 'pruned' when this run's store records that checkpoint retention
        (run.keep_checkpoints) deleted `ckpt`'s directory."""
        from mel_core.store import lineage

        if "store" not in self.__dict__ and not (self.run_dir / DB_FILE).exists():
            return
        row = lineage.checkpoint(self.store, ckpt.checkpoint_id)
        if row and row.get("pruned_at") is not None:
            raise MissingCheckpoint(f"checkpoint {ckpt.checkpoint_id} (step {row['step']}) was pruned at "
                                    f"{row['pruned_at']:%Y-%m-%d %H:%M:%S} by run.keep_checkpoints: its weights are "
                                    f"deleted, its records remain (README, 'Checkpoint retention')")

    def ensure_version(self, ckpt: Checkpoint) -> None:
        """Load the policy and the engine on first use; afterwards move both to `ckpt` if they are elsewhere. Every
        load first checks the checkpoint's files against what was recorded when they were written."""
        from mel_core.model.policy import Policy

        if self._policy is None or self._policy_version != ckpt.checkpoint_id or self._engine is None:
            self.settle_saves()  # a load from disk follows: the checkpoint being written may be the one it reads
        ckpt = self.locate(ckpt)
        if self._policy is None or self._policy_version != ckpt.checkpoint_id:
            self.check_files(ckpt)  # after the settle: the files and their digests are then committed
        if self._policy is None:
            # A LoRA checkpoint holds adapters only: build on the base model, then load them.
            self._policy = Policy(self.cfg, self.base_checkpoint.path if self.cfg.model.lora.enabled else ckpt.path)
            if has_optimizer_state(ckpt.path) or self.cfg.model.lora.enabled:
                self._policy.load_checkpoint(ckpt.path)
            self._policy_version = ckpt.checkpoint_id
        elif self._policy_version != ckpt.checkpoint_id:
            self._policy.load_checkpoint(ckpt.path)
            self._policy_version = ckpt.checkpoint_id
        if self._engine is None:
            self._engine = self._build_engine(ckpt)
        self._serve(ckpt)

    def check_files(self, ckpt: Checkpoint) -> None:
        """DamagedCheckpoint (permanent, one line naming the file) when a file of `ckpt` is missing or differs from
        the digest recorded with its row: the one place every load that trains or evaluates passes, so damaged
        weights are never trained on, served or scored (Ray workers and FSDP ranks load what this process checked).
        A checkpoint with nothing recorded (the base model, a store from before digests) loads unchecked; without a
        store (mel gate on a fresh config) there is nothing to check against, and none is created to look."""
        from mel_core.store import lineage

        if "store" not in self.__dict__ and not (self.run_dir / DB_FILE).exists():
            return
        verify_checkpoint(ckpt.checkpoint_id, ckpt.path, lineage.checkpoint_files(self.store, ckpt.checkpoint_id))

    def use_engine(self, engine) -> None:
        """Generate with `engine` (any :class:`mel_core.model.engines.base.Engine`) instead of the configured one: Ray
        workers (flows/workers.py), a backend of the user's own, or a test that decides what the model says to
        construct a situation. The policy still trains for real; the engine is told each version it must serve."""
        self._engine, self._given_engine = engine, True

    def drop_engine(self) -> None:
        """Forget an engine given with :meth:`use_engine` (its workers are gone): the next use builds the
        configured one."""
        self._engine, self._given_engine = None, False

    @property
    def has_given_engine(self) -> bool:
        return self._given_engine

    @property
    def _engine_shares_policy(self) -> bool:
        """The HF engine in this process generates with the policy's own module: no reload on a new version."""
        return (not self._given_engine and self.cfg.model.engine == "hf"
                and self.cfg.orchestration.runner == "local")

    def _build_engine(self, ckpt: Checkpoint):
        if self.cfg.orchestration.runner != "local":
            raise config_mod.ConfigError(
                f"config key 'orchestration.runner': {self.cfg.orchestration.runner} workers are started by a flow "
                f"(flows/workers.py: the campaign and evaluation flows), not by the stage functions alone")
        if self.cfg.model.engine == "vllm":
            from mel_core.model.engines.vllm import VLLMEngine
            m = self.cfg.model
            # With LoRA, vLLM serves the base model and each version is an adapter on it.
            return VLLMEngine(self.base_checkpoint.path if m.lora.enabled else ckpt.path,
                              self._policy.tokenizer, dtype=m.dtype, seed=self.cfg.run.seed,
                              lora_rank=m.lora.r if m.lora.enabled else None, kv_cache_gib=m.vllm.kv_cache_gib,
                              progress=True, stop_ids=self.stop_ids)
        from mel_core.model.engines.hf import HFEngine
        return HFEngine(self._policy.model, self._policy.tokenizer, loader=self._policy.load_checkpoint,
                        max_batch_sequences=self.cfg.sampling.chunk_sequences, progress=True,  # bars on a TTY only
                        stop_ids=self.stop_ids, compute=self._policy.compute)

    @property
    def _engine_takes_weights(self) -> bool:
        """The vLLM engine in this process, full fine-tuning: an update's weights reach it in memory."""
        return (not self._given_engine and self.cfg.model.engine == "vllm" and not self.cfg.model.lora.enabled
                and self.cfg.orchestration.runner == "local")

    def _serve(self, ckpt: Checkpoint) -> None:
        """Point the engine at the policy's version `ckpt`. The HF engine generates with the policy's own
        module, which holds it already; the vLLM engine loads the checkpoint's weights or adapter; workers
        load it when a job names it."""
        if self._engine_shares_policy:
            self._engine.version = ckpt.checkpoint_id
        else:
            self._engine.load_version(ckpt.checkpoint_id, ckpt.path)

    def trained_to(self, ckpt: Checkpoint) -> None:
        """The update trained the policy in place and saved it as `ckpt`: generate from it from now on. The HF
        engine's module is the policy's; the vLLM engine (full fine-tuning) is handed the trained module's weights
        in memory, not the checkpoint just written; LoRA adapters and workers load the checkpoint."""
        self._policy_version = ckpt.checkpoint_id
        if self._engine_takes_weights:
            self._engine.update_weights(ckpt.checkpoint_id, self._policy.named_weights())
        else:
            self._serve(ckpt)

    # ------------------------------------------------------------ checkpoints written in the background

    @property
    def saves_in_background(self) -> bool:
        """run.async_save, where nothing has to read the new checkpoint's directory to generate from it: the HF
        engine generates with the trained module itself, the vLLM engine (full fine-tuning) is handed its tensors in
        memory, and an engine given with :meth:`use_engine` may say so (``reads_checkpoints = False``). LoRA adapters
        on vLLM and Ray workers load the directory: for them the update writes it before the engine moves."""
        given_in_memory = self._given_engine and not getattr(self._engine, "reads_checkpoints", True)
        return self.cfg.run.async_save and (self._engine_shares_policy or self._engine_takes_weights or given_in_memory)

    def save_in_background(self, step: int, ckpt: Checkpoint, write, rows: dict[str, list[dict]]) -> None:
        """Write `ckpt`'s directory with `write` (the policy's host copy, :meth:`Policy.checkpoint_writer`) on the save
        thread, and keep `rows` (table -> rows: the update's records) to commit once it is on disk
        (:meth:`settle_saves`). One save at a time: an earlier one is settled first."""
        self.settle_saves()
        self._pending_save = async_save.start(step, ckpt, write, rows)

    @property
    def saving_step(self) -> int | None:
        """The step whose checkpoint is being written in the background (its rows uncommitted), or None."""
        return self._pending_save.step if self._pending_save else None

    @property
    def checkpoints_in_use(self) -> set[str]:
        """The checkpoints checkpoint retention must not touch now: the one the policy holds (the next step reads it)
        and one being written in the background."""
        return {c for c in (self._policy_version, self._pending_save and self._pending_save.checkpoint.checkpoint_id)
                if c}

    def settle_saves(self) -> None:
        """Wait for the checkpoint being written in the background, then commit the rows its update left (checkpoint,
        update, internalized, metrics) in one transaction. A failed write is raised here as
        :class:`mel_core.model.async_save.SaveFailed`, permanent: whatever stage called this cannot bring the checkpoint
        back, and until the update is recomputed nothing may be recorded on top of it."""
        pending = self._pending_save
        if pending is None:
            return
        t0 = time.perf_counter()
        try:
            seconds = pending.future.result()
        except BaseException as e:
            if not pending.future.done():  # interrupted while waiting (Ctrl-C): the write goes on, still pending
                raise
            self._pending_save = None
            raise async_save.SaveFailed(
                f"the checkpoint of step {pending.step} ({pending.checkpoint.path}) could not be written in the "
                f"background: {type(e).__name__}: {e}; nothing was recorded of it or after it: rerun the campaign to "
                f"recompute step {pending.step}'s update from its parent checkpoint") from e
        with self.store.transaction() as w:
            for table, rows in pending.rows.items():
                w.insert(table, rows)
        self._pending_save = None
        _log.info("step %d: checkpoint written in the background in %.1f s (%.1f s of it waited for)", pending.step,
                  seconds, time.perf_counter() - t0)

    def forget_version(self) -> None:
        """The policy's weights may have left every saved version (a failed update): the next
        :meth:`ensure_version` reloads them. A vLLM engine or workers still hold the version they served."""
        self._policy_version = None
        if self._engine_shares_policy:
            self._engine.version = None

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


@dataclass(frozen=True)
class RunHandle:
    """A campaign's runtime as flows and tasks pass it: three strings (Prefect records them as the flow run's
    parameter), resolved to this process's :class:`Runtime` by one dict lookup (:func:`runtime_of`). The config is
    parsed once per process, when the runtime is built; nothing below the campaign flow parses it again."""
    run_id: str
    name: str
    key: str  # the process registry's key: the whole config's hash and the runs root


_RUNTIMES: dict[str, Runtime] = {}


def _registry_key(cfg: MelConfig) -> str:
    return config_mod.config_hash(cfg, exclude=()) + ":" + str(Path(cfg.run.root_dir).resolve())


def get_runtime(cfg: MelConfig) -> Runtime:
    """The process's runtime for this config (built once); its :attr:`Runtime.handle` names it for flows and tasks."""
    key = _registry_key(cfg)
    rt = _RUNTIMES.get(key)
    if rt is None:
        rt = _RUNTIMES[key] = Runtime(cfg)
        rt.handle = RunHandle(rt.run_id, cfg.run.name, key)
    return rt


def runtime_of(run: RunHandle) -> Runtime:
    """The runtime `run` names, built in this process by :func:`get_runtime`."""
    rt = _RUNTIMES.get(run.key)
    if rt is None:
        raise RuntimeError(f"run {run.name} ({run.run_id}) has no runtime in this process: flows and tasks take the "
                           f"handle of a runtime built with get_runtime(cfg)")
    return rt


def clear_runtimes() -> None:
    _RUNTIMES.clear()
