"""The trainable policy: load, one optimizer step on L = L_RL + lambda * L_NLL, save, move to a version.

The same module serves generation (``mel_core.model.engines.hf``) and training, so an update is visible to
the next generation without a copy. Checkpoints hold the HF model, the tokenizer and the optimizer
state, written to a temporary directory and renamed into place, so a crash leaves either the whole
checkpoint or none.

Precision: the weights, their gradients and AdamW's moments are kept in ``model.master_dtype`` (float32 by
default), and every forward — the update's, the log-probs of pi_old and pi_ref, generation — runs in
``model.dtype`` through :meth:`Policy.compute` (``torch.autocast`` when the compute dtype is narrower). At lr 1e-6
a step is far below half a bfloat16 ulp of most weights, so bfloat16 master weights would round it away.
Checkpoints hold the master weights, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from mel_core.algorithm import losses
from mel_core.atomic_files import write_dir_atomically
from mel_core.config import MelConfig
from mel_core.errors import PermanentError
from mel_core.model.checkpoints import OPTIMIZER_FILE, MissingCheckpoint, reading_checkpoint, write_checkpoint
from mel_core.tokens import encode_prompts


class NonFiniteLoss(PermanentError, FloatingPointError):
    """The step's loss, gradient norm or updated weights are NaN/inf: the step is refused and no
    checkpoint is written."""


@dataclass
class RLBatch:
    """Rollouts of one step: prompt text, generated token ids, advantage per sequence."""
    prompts: list[str]
    completion_ids: list[list[int]]
    advantages: torch.Tensor  # [N]


@dataclass
class NLLBatch:
    """Accepted meta-experiences: retrospective context (analysis prompt) and the trained text M* (ids, eos
    last). `parts` labels each target id with the index in `part_names` of the part of M it belongs to; the
    update logs the NLL of each part (nll_<name>) over every target id. `trained` is 1 for each target id that
    carries loss, 0 for one that does not (experience.nll_parts, mask_quoted_solution); None: every id does."""
    prompts: list[str]
    target_ids: list[list[int]]
    parts: list[list[int]] | None = None
    part_names: Sequence[str] = ()
    trained: list[list[int]] | None = None


@dataclass(frozen=True)
class DataParallel:
    """This process computes one rank's share of a data-parallel update (mel_core/model/distributed.py): every
    `world`-th micro-batch, with the whole batch's loss weights, its model sharded across the ranks."""
    rank: int
    world: int

    def my_parts(self, parts: list) -> list[tuple[torch.Tensor, float]]:
        """(micro-batch, 1.0) for each micro-batch this rank computes: every rank-th one, and as many on every
        rank — each forward and backward of a sharded model is a collective — so a rank short of one recomputes
        the first with weight 0. No parts at all (e.g. no accepted M): none on any rank."""
        if not parts:
            return []
        mine = [(p, 1.0) for p in parts[self.rank::self.world]]
        return mine + [(parts[0], 0.0)] * (-(-len(parts) // self.world) - len(mine))

    @staticmethod
    def sum(values: list[float]) -> list[float]:
        """Sum `values` over the ranks."""
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.tolist()


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class _AdaptersOff(torch.nn.Module):
    """Calls a peft model with its adapters disabled: the frozen base as the KL reference."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **kw):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kw)


def resolve_device(name: str) -> torch.device:
    """`model.device` as a torch device: auto is the first GPU when torch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def adamw_settings(cfg: MelConfig) -> dict:
    """AdamW's hyperparameters from optim.*."""
    o = cfg.optim
    return {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay}


def adamw(cfg: MelConfig, model) -> torch.optim.AdamW:
    """The optimizer of every update path: AdamW (optim.*) over the trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **adamw_settings(cfg))


def apply_optimizer_settings(cfg: MelConfig, optimizer: torch.optim.Optimizer) -> None:
    """The config's hyperparameters over those a loaded optimizer state brought: torch's load_state_dict restores
    each group's lr, betas and weight decay as saved, and a fork with another optim.lr must train at its own lr
    (the saved moments are what it continues)."""
    for group in optimizer.param_groups:
        group.update(adamw_settings(cfg))


def local_or_hub(path: str | Path) -> str:
    """`path` as transformers is to read it. A path that names a local directory (absolute, ./ ../ ~, or one that
    exists) must be one: transformers would otherwise take a missing directory for a hub repo id and fail with a
    hub error that reads as transient. MissingCheckpoint (permanent, one line) instead; a hub name passes."""
    text = str(path)
    p = Path(text).expanduser()
    if (p.is_absolute() or text.startswith((".", "~")) or p.exists()) and not p.is_dir():
        raise MissingCheckpoint(f"{text}: no such model or checkpoint directory (a local path, never looked up on "
                                f"the Hugging Face hub)")
    return text


def _load_tied(model, state: dict, path) -> None:
    """load_state_dict that knows tied weights: save_pretrained writes a tied lm_head once, under the embedding's name
    (SmolLM2, Qwen3-0.6B/1.7B/4B), so its key is missing from the file but its tensor is loaded through the embedding.
    Anything else missing or unexpected is refused, as a strict load would."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name in state}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise RuntimeError(f"{path}: weights that do not fit the model (missing {untied[:5]}, unexpected "
                           f"{list(unexpected)[:5]})")


class Policy:
    def __init__(self, cfg: MelConfig, path: str | Path, prepare: Callable[[torch.nn.Module], None] | None = None):
        """The model and tokenizer at `path` (full or with LoRA adapters) and its optimizer. `prepare` changes the
        model in place before the optimizer is built over its parameters (FSDP's sharding, mel_core.model.distributed)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-step loads/saves would flood the campaign's output
        self.cfg = cfg
        path = local_or_hub(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.compute_dtype, self.master_dtype = _dtype(cfg.model.dtype), _dtype(cfg.model.master_dtype)
        self.lora = cfg.model.lora.enabled
        # LoRA: the base never steps, so it is held in the compute dtype (a wider copy would only cost memory); peft
        # keeps the adapters float32 whatever the base's dtype (its autocast_adapter_dtype), as before master_dtype.
        with reading_checkpoint(path):
            self.model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=self.compute_dtype if self.lora else self.master_dtype)
        if self.lora:
            from peft import LoraConfig, get_peft_model
            lc = cfg.model.lora
            self.model = get_peft_model(self.model, LoraConfig(
                r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                task_type="CAUSAL_LM"))
        self.device = resolve_device(cfg.model.device)
        self.model.to(self.device)
        self.model.train()
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if prepare is not None:
            prepare(self.model)
        self.optimizer = adamw(cfg, self.model)
        self._ref_model = None
        self._base_path = str(path)
        self._tokenizer_copy = None  # what background saves write (checkpoint_writer)
        self._host_copy, self._host_copy_in_use = None, False  # their host buffers, and whether a writer has them

    def compute(self) -> contextlib.AbstractContextManager:
        """Where every forward of this policy runs (training, log-probs, HF generation, scoring): under autocast to
        the compute dtype when the master weights are wider (float32 weights, bfloat16 matmuls, as verl and AMP
        do), else as the weights are. Backward runs outside it, as autocast asks. LoRA: as the weights are (the base
        is in the compute dtype already, and peft runs the float32 adapters in theirs)."""
        if self.lora or self.compute_dtype == self.master_dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    # ------------------------------------------------------------------ versions and checkpoints

    def load_checkpoint(self, path: str | Path) -> None:
        """Move the (shared) model and the optimizer to the state saved at `path`, in place."""
        self.load_weights(path)
        opt = Path(path) / OPTIMIZER_FILE
        if opt.exists():
            with reading_checkpoint(path):
                state = torch.load(opt, map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(state)
            apply_optimizer_settings(self.cfg, self.optimizer)
        else:  # a base model: fresh optimizer state
            self.optimizer.state.clear()

    def load_weights(self, path: str | Path) -> None:
        """Move the model (not the optimizer: a generation worker never steps) to the weights saved at `path`."""
        path = Path(local_or_hub(path))
        with reading_checkpoint(path):
            self._load_weights(path)

    def _load_weights(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        weights = path / "model.safetensors"
        adapter = path / "adapter_model.safetensors"
        if self.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            if adapter.exists():
                set_peft_model_state_dict(self.model, load_file(str(adapter)))
            else:  # the base model: adapters at their initialisation (B = 0, i.e. the base policy)
                self._reset_adapters()
        elif weights.exists():
            from safetensors.torch import load_file
            state = load_file(str(weights))
        else:
            state = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.master_dtype).state_dict()
        if not self.lora:
            _load_tied(self.model, state, path)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The full model's parameters as (name, tensor) pairs, named as in its checkpoint: what an engine beside the
        trainer copies in memory after an update (:meth:`mel_core.model.engines.vllm.VLLMEngine.update_weights`).
        In the compute dtype, which the engine serves in (model.dtype): the module's own tensors when the master
        weights are that dtype, else a rounded copy made one tensor at a time (the rounding vLLM's loader would do
        when it copies a wider tensor into its own; done here, no loader is relied on to accept it). A tied
        parameter comes once, under its first name (the input embedding). Not for LoRA: its versions are served as
        adapter checkpoints."""
        if self.lora:
            raise RuntimeError("a LoRA policy's versions are adapter checkpoints, not full weights")
        for name, param in self.model.named_parameters():
            yield name, param.detach().to(self.compute_dtype)

    def _reset_adapters(self) -> None:
        for module in self.model.modules():
            if hasattr(module, "reset_lora_parameters"):
                for name in getattr(module, "lora_A", {}):
                    module.reset_lora_parameters(name, True)

    def save_checkpoint(self, path: str | Path, update_stats: dict | None = None) -> Path:
        """Write model + tokenizer + optimizer (+ the update's stats) to `path` atomically (temp dir, then rename)."""
        return write_dir_atomically(path, lambda tmp: write_checkpoint(
            tmp, self.model, self.tokenizer, self.optimizer.state_dict(), update_stats))

    def checkpoint_writer(self, update_stats: dict | None = None) -> Callable[[Path], None]:
        """What :meth:`save_checkpoint` would write now, copied to host memory now, and a function that writes it into
        a directory later, on another thread (run.async_save, mel_core.model.async_save): the optimizer steps and
        weight loads that follow change this policy in place, never the copy. LoRA copies the trainable adapters
        alone, all a LoRA checkpoint holds. The tokenizer is a private copy too: encoding on the main thread may set
        padding or truncation on the shared one while its files are being written.

        The host buffers are kept and refilled by the next call (fresh memory costs more to touch than to copy),
        unless the writer they went to has not finished: then the next copy takes fresh ones."""
        from mel_core.model.async_save import host_copy

        state = self.model.state_dict()
        if self.lora:
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        reuse = self._host_copy if not self._host_copy_in_use else None
        self._host_copy = copied = host_copy((state, self.optimizer.state_dict()), into=reuse)
        self._host_copy_in_use = True
        state, optimizer_state = copied
        stats = dict(update_stats) if update_stats is not None else None  # the caller goes on editing its own
        if self._tokenizer_copy is None:
            import copy
            self._tokenizer_copy = copy.deepcopy(self.tokenizer)
        tokenizer = self._tokenizer_copy

        def write(tmp: Path) -> None:
            try:
                write_checkpoint(tmp, self.model, tokenizer, optimizer_state, stats, state_dict=dict(state))
            finally:
                if self._host_copy is copied:  # written (or failed): the next copy may refill these buffers
                    self._host_copy_in_use = False
        return write

    # ------------------------------------------------------------------------------- the update

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt ids exactly as the engines encode them (mel_core.tokens: one path for sampler and trainer)."""
        return encode_prompts(self.tokenizer, prompts)

    def encode(self, prompts: Sequence[str], completions: Sequence[Sequence[int]],
               labels: Sequence[Sequence[int]] | None = None):
        """[left-padded prompt | right-padded completion] ids and attention mask [B, P+T], the completion mask
        [B, T], and (with `labels`, one per completion token) the labels laid out like the mask [B, T].

        Completions share the last T columns, so log-probs are taken for those columns only
        (losses.per_token_logps with logits_to_keep=T, as TRL lays batches out): the logits over the
        prompts — for a real model most of each sequence, and of the [B, L, V] logits memory — are never
        formed. Left padding moves a row's positions by a constant, which RoPE attention does not see.

        Nothing is cut: the stages make every sequence fit model.max_seq_len (problems that do not fit are
        refused before step 1, retrospective contexts are shortened in their solutions' middle), so a longer
        one here is a bug, refused rather than trained on a context other than the one it was generated in.
        """
        max_len = self.cfg.model.max_seq_len
        pad = self.tokenizer.pad_token_id
        pairs = list(zip(self.encode_prompts(prompts), (list(c) for c in completions)))
        for i, (p, c) in enumerate(pairs):
            if len(p) + len(c) > max_len:
                raise ValueError(f"sequence {i} is {len(p)} prompt + {len(c)} completion tokens, longer than "
                                 f"model.max_seq_len={max_len}: it would have to be cut")
        P = max(len(p) for p, _ in pairs)
        T = max(1, max(len(c) for _, c in pairs))
        input_ids = torch.full((len(pairs), P + T), pad, dtype=torch.long)  # [B, P+T]
        attention = torch.zeros((len(pairs), P + T), dtype=torch.long)  # [B, P+T]
        completion_mask = torch.zeros((len(pairs), T), dtype=torch.float32)  # [B, T]
        label_grid = torch.zeros((len(pairs), T), dtype=torch.long)  # [B, T]
        for i, (p, c) in enumerate(pairs):
            input_ids[i, P - len(p):P + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attention[i, P - len(p):P + len(c)] = 1
            completion_mask[i, :len(c)] = 1
            if labels is not None:
                label_grid[i, :len(c)] = torch.tensor(list(labels[i]), dtype=torch.long)
        return input_ids, attention, completion_mask, label_grid

    @staticmethod
    def _rows(ids, attn, mask, part):
        """Rows `part` of an encoded batch without the columns that are padding in every one of them."""
        P = ids.size(1) - mask.size(1)
        prompt_width = int(attn[part, :P].sum(1).max())
        completion_width = max(1, int(mask[part].sum(1).max()))
        cols = slice(P - prompt_width, P + completion_width)
        return ids[part, cols], attn[part, cols], mask[part, :completion_width]

    def _reference(self):
        if self.lora:  # the reference is the base model: the same weights with adapters switched off
            return _AdaptersOff(self.model)
        if self._ref_model is None:  # held as the policy's weights are, so pi_ref = pi_theta at version 0 exactly
            from transformers import AutoModelForCausalLM
            self._ref_model = AutoModelForCausalLM.from_pretrained(
                self._base_path, dtype=self.master_dtype).to(self.device).eval()
            self._ref_model.requires_grad_(False)
        return self._ref_model

    def _frozen_logps(self, model, ids, attn, mask, temperature: float, size: int) -> torch.Tensor:
        """Completion log-probs of a whole batch without grad, `size` sequences at a time: pi_old or pi_ref."""
        with torch.no_grad(), self.compute():
            return losses.per_token_logps(model, ids, attn, mask.size(1), temperature, batch_size=size)  # [N, T]

    def train_step(self, rl: RLBatch, nll: NLLBatch | None, data_parallel: DataParallel | None = None) -> dict:
        """L = L_RL + lambda * L_NLL (paper Eq. 10 + the NLL term), over mini-batches and epochs.

        Default (paper): one optimizer step on the whole batch, pi_old = pi_theta detached. With
        `optim.mini_batch_size` / `epochs_per_step`, pi_old log-probs are computed once before the
        first step and every step's ratio is taken against them (PPO). Micro-batches accumulate
        gradients with weights that keep each loss's aggregation exact (losses.micro_batch_weight).
        The accepted meta-experiences are split across the mini-batches of an epoch, so each is
        learned once per epoch. With `data_parallel`, this process computes its rank's share of every
        mini-batch (sharded model, mel_core/model/distributed.py) and the step is the one a single process takes.
        """
        L, O = self.cfg.loss, self.cfg.optim
        self.model.train()
        ids, attn, mask, _ = (t.to(self.device) for t in self.encode(rl.prompts, rl.completion_ids))  # [N, P+T], [N, T]
        N = ids.size(0)
        mini = O.mini_batch_size or N
        micro = O.micro_batch_size or mini
        T = self.cfg.sampling.temperature
        old = (self._frozen_logps(self.model, ids, attn, mask, T, micro)  # [N, T]
               if O.epochs_per_step > 1 or mini < N else None)
        ref = self._frozen_logps(self._reference(), ids, attn, mask, T, micro) if L.beta > 0 else None  # [N, T]
        rl_data = (ids, attn, mask, rl.advantages.to(self.device), old, ref, attn.sum(1).cpu())
        use_nll = nll is not None and len(nll.prompts) > 0 and L.nll_coef > 0
        nll_data = self._encode_nll(nll) if use_nll else None  # ids, attn, mask, parts, loss mask
        mini_batches = [torch.arange(i, min(i + mini, N)) for i in range(0, N, mini)]
        nll_parts = (torch.tensor_split(torch.arange(nll_data[0].size(0)), len(mini_batches)) if use_nll
                     else [torch.arange(0)] * len(mini_batches))
        part_names = list(nll.part_names) if use_nll and nll.parts is not None else []
        part_sums = torch.zeros((2, max(1, len(part_names))), dtype=torch.float64)  # [sums | counts, parts]

        sums: dict[str, float] = {}
        steps = 0
        for epoch in range(O.epochs_per_step):
            for mb, nll_mb in zip(mini_batches, nll_parts):
                self.optimizer.zero_grad(set_to_none=True)
                rl_total, metrics = self._rl_micro_steps(rl_data, mb, micro, data_parallel)
                # loss.nll_normalization: batch divides by this optimizer step's share of the B prompts
                batch_prompts = self.cfg.sampling.prompts_per_step * len(mb) / N
                nll_total = self._nll_micro_steps(nll_data, nll_mb, micro, data_parallel,
                                                  part_sums if part_names and epoch == 0 else None, batch_prompts)
                if data_parallel is not None:  # each rank summed its share of the micro-batches
                    rl_total, nll_total, *values = DataParallel.sum([rl_total, nll_total, *metrics.values()])
                    metrics = dict(zip(metrics, values))
                grad_norm = self._optimizer_step(data_parallel)
                steps += 1
                step_stats = {"loss": losses.total_loss(rl_total, nll_total, L.nll_coef), "rl_loss": rl_total,
                              "nll_loss": nll_total, "grad_norm": grad_norm, **metrics}
                for k, v in step_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / steps for k, v in sums.items()}  # means over the optimizer steps of this update
        out.update(num_sequences=N, num_nll_sequences=len(nll.prompts) if use_nll else 0, optimizer_steps=steps,
                   num_nll_trained_tokens=int(nll_data[4].sum()) if use_nll else 0)
        out.update(self._nll_by_part(part_sums, part_names, data_parallel))
        return out

    def _rl_micro_steps(self, data, mb: torch.Tensor, micro: int, dp: DataParallel | None) -> tuple[float, dict]:
        """Backward of L_RL over mini-batch `mb`, micro-batch by micro-batch, each weighted so the sum is the
        mini-batch's loss under its aggregation (losses.micro_batch_weight). Returns (L_RL, loss metrics)."""
        L = self.cfg.loss
        ids, attn, mask, advantages, old, ref, lengths = data
        total, metrics = 0.0, {}
        # Micro-batches of similar lengths: each is cut to its longest row, so less padding is computed.
        by_length = mb[torch.argsort(lengths[mb], stable=True)]
        parts = list(torch.split(by_length, micro))
        for part, keep in (dp.my_parts(parts) if dp else [(p, 1.0) for p in parts]):
            p_ids, p_attn, m_mask = self._rows(ids, attn, mask, part)  # [m, p+t], [m, p+t], [m, t]
            t = m_mask.size(1)
            with self.compute():
                logps = losses.per_token_logps(self.model, p_ids, p_attn, t, self.cfg.sampling.temperature)  # [m, t]
            loss_part, met = losses.policy_loss(
                L.policy_loss, logps, old[part, :t] if old is not None else logps.detach(),
                advantages[part].to(logps.dtype), m_mask,
                ref_per_token_logps=ref[part, :t] if ref is not None else None, beta=L.beta,
                epsilon=L.epsilon, epsilon_high=L.epsilon_high, max_completion_length=self.cfg.sampling.max_new_tokens)
            w = losses.micro_batch_weight(L.policy_loss, m_mask, mask[mb]) * keep
            self._backward(w * loss_part * self._grad_scale(dp), "rl")
            total += w * loss_part.item()
            for k, v in met.items():
                metrics[k] = metrics.get(k, 0.0) + w * float(v)
        return total, metrics

    def _encode_nll(self, nll: NLLBatch) -> tuple[torch.Tensor, ...]:
        """The NLL targets laid out for the update: ids, attention, target mask and part labels (Policy.encode), and
        the loss mask — the target mask less the ids `nll.trained` leaves without loss."""
        ids, attn, mask, labels = self.encode(nll.prompts, nll.target_ids, nll.parts)
        loss_mask = mask.clone()
        if nll.trained is not None:
            for i, (row, target) in enumerate(zip(nll.trained, nll.target_ids, strict=True)):
                if len(row) != len(target):
                    raise ValueError(f"NLL target {i}: {len(row)} trained flags for {len(target)} ids")
                loss_mask[i, :len(row)] = torch.tensor(list(row), dtype=loss_mask.dtype)
        return tuple(t.to(self.device) for t in (ids, attn, mask, labels, loss_mask))

    def _nll_micro_steps(self, data, nll_mb: torch.Tensor, micro: int, dp: DataParallel | None,
                         part_sums: torch.Tensor | None, batch_prompts: float) -> float:
        """Backward of lambda * L_NLL over this mini-batch's share of the targets: each target's mean NLL over its
        trained tokens, summed and divided per loss.nll_normalization (losses.nll_denominator: the number of targets,
        or `batch_prompts`); with `part_sums`, each part's summed NLL and token count over every target token are
        added to it."""
        if data is None or not len(nll_mb):
            return 0.0
        ids, attn, mask, labels, loss_mask = data
        denominator = losses.nll_denominator(self.cfg.loss.nll_normalization, len(nll_mb), batch_prompts)
        total = 0.0
        parts = list(torch.split(nll_mb, micro))
        for part, keep in (dp.my_parts(parts) if dp else [(p, 1.0) for p in parts]):
            p_ids, p_attn, p_mask = self._rows(ids, attn, mask, part)  # [m, p+t], [m, p+t], [m, t]
            with self.compute():
                n_logps = losses.per_token_logps(self.model, p_ids, p_attn, p_mask.size(1), 1.0)  # [m, t]
            nl, _ = losses.nll_loss(n_logps, loss_mask[part, :p_mask.size(1)])  # mean over the part's targets
            w = len(part) / denominator * keep
            self._backward(self.cfg.loss.nll_coef * w * nl * self._grad_scale(dp), "nll")
            total += w * nl.item()
            if part_sums is not None and keep:
                s, c = losses.nll_by_part(n_logps, p_mask, labels[part, :p_mask.size(1)], part_sums.size(1))
                part_sums[0] += s.cpu()
                part_sums[1] += c.cpu()
        return total

    def _optimizer_step(self, dp: DataParallel | None) -> float:
        """Clip, refuse a non-finite gradient norm or non-finite weights, step; returns the gradient norm."""
        clip = self.cfg.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # sharded
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"gradient norm is {grad_norm.item()}: step refused")
        self.optimizer.step()
        self._refuse_non_finite_weights(dp)
        return grad_norm.item()

    @staticmethod
    def _nll_by_part(part_sums: torch.Tensor, names: list[str], dp: DataParallel | None) -> dict:
        """nll_<part>: the token-mean NLL of each part of M over the step's targets (first epoch)."""
        if not names:
            return {}
        sums, counts = part_sums.tolist()
        if dp is not None:
            sums, counts = DataParallel.sum(sums), DataParallel.sum(counts)
        return {f"nll_{name}": s / c for name, s, c in zip(names, sums, counts) if c > 0}

    @staticmethod
    def _grad_scale(dp: DataParallel | None) -> float:
        """A sharded model's gradients are averaged over ranks; each rank's losses are shares of the one
        batch loss, whose gradient is their sum: scale by the world size."""
        return float(dp.world) if dp else 1.0

    def _refuse_non_finite_weights(self, dp: DataParallel | None) -> None:
        """A finite loss and gradient can still step to inf/NaN weights (e.g. an infinite learning rate);
        saving them would hand every later step a NaN loss. One device sync for all parameters."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        finite = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in params]).all()
        if dp is not None:  # every rank must refuse, or the others wait for it forever
            finite = torch.tensor(DataParallel.sum([0.0 if finite else 1.0])[0] == 0)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss("the optimizer step left non-finite weights: step refused, no checkpoint written")

    def _backward(self, loss: torch.Tensor, what: str) -> None:
        """Refuse the step before any parameter moves if a loss is NaN/inf."""
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"{what} loss is {loss.item()}: step refused, no checkpoint written")
        loss.backward()
