"""The trainable policy: load, one optimizer step on L = L_RL + lambda * L_NLL, save, move to a version.

The same module serves generation (``mel_core.engines.hf``) and training, so an update is visible to
the next generation without a copy. Checkpoints hold the HF model, the tokenizer and the optimizer
state, written to a temporary directory and renamed into place, so a crash leaves either the whole
checkpoint or none.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mel_core import losses
from mel_core.config import MelConfig
from mel_core.errors import PermanentError

OPTIMIZER_FILE = "optimizer.pt"


class NonFiniteLoss(PermanentError, FloatingPointError):
    """The step's loss is NaN/inf: the step is refused and no checkpoint is written."""


@dataclass
class RLBatch:
    """Rollouts of one step: prompt text, generated token ids, advantage per sequence."""
    prompts: list[str]
    completion_ids: list[list[int]]
    advantages: torch.Tensor  # [N]


@dataclass
class NLLBatch:
    """Accepted meta-experiences: retrospective context (analysis prompt) and the policy's own analysis."""
    prompts: list[str]
    target_ids: list[list[int]]


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class Policy:
    def __init__(self, cfg: MelConfig, path: str | Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(cfg.model.dtype))
        self.model.train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=tuple(o.betas),
                                           weight_decay=o.weight_decay)
        self._ref_model = None
        self._base_path = str(path)

    # ------------------------------------------------------------------ versions and checkpoints

    def load_checkpoint(self, path: str | Path) -> None:
        """Move the (shared) model and the optimizer to the state saved at `path`, in place."""
        from transformers import AutoModelForCausalLM

        path = Path(path)
        weights = path / "model.safetensors"
        if weights.exists():
            from safetensors.torch import load_file
            state = load_file(str(weights))
        else:
            state = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(self.cfg.model.dtype)).state_dict()
        self.model.load_state_dict(state)
        opt = path / OPTIMIZER_FILE
        if opt.exists():
            self.optimizer.load_state_dict(torch.load(opt, map_location="cpu", weights_only=True))
        else:  # a base model: fresh optimizer state
            self.optimizer.state.clear()

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write model + tokenizer + optimizer to `path` atomically (temp dir, then rename)."""
        path = Path(path)
        if path.exists():
            return path
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------------------------- the update

    def encode(self, prompts: Sequence[str], completions: Sequence[Sequence[int]]):
        """Right-padded [prompt | completion] sequences and the mask of completion positions.

        Retrospective contexts hold two full solutions and can exceed the window: the prompt is
        left-truncated (its end — the correct solution and the analysis cue — is kept); a completion
        longer than the window on its own is cut at the end.
        """
        max_len = self.cfg.model.max_seq_len
        pad = self.tokenizer.pad_token_id
        rows, masks = [], []
        for p, c in zip(prompts, completions):
            p_ids = self.tokenizer(p, add_special_tokens=False)["input_ids"]
            c_ids = list(c)[: max_len - 1]
            p_ids = p_ids[-(max_len - len(c_ids)):] if len(p_ids) + len(c_ids) > max_len else p_ids
            rows.append(p_ids + c_ids)
            masks.append([0] * len(p_ids) + [1] * len(c_ids))
        L = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), pad, dtype=torch.long)  # [B, L]
        attention = torch.zeros((len(rows), L), dtype=torch.long)
        target = torch.zeros((len(rows), L), dtype=torch.float32)
        for i, (r, m) in enumerate(zip(rows, masks)):
            input_ids[i, : len(r)] = torch.tensor(r)
            attention[i, : len(r)] = 1
            target[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
        return input_ids, attention, target[:, 1:]  # mask aligned with next-token predictions [B, L-1]

    def token_logps(self, model, input_ids, attention_mask, temperature: float) -> torch.Tensor:
        """log pi(token_t | tokens_<t) for t = 1..L-1, logits divided by the sampling temperature."""
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # [B, L-1, V]
        if temperature and temperature != 1.0:
            logits = logits / temperature
        return losses.selective_log_softmax(logits, input_ids[:, 1:])  # [B, L-1]

    def _reference(self):
        if self._ref_model is None:
            from transformers import AutoModelForCausalLM
            self._ref_model = AutoModelForCausalLM.from_pretrained(self._base_path, dtype=_dtype(self.cfg.model.dtype)).eval()
            self._ref_model.requires_grad_(False)
        return self._ref_model

    def train_step(self, rl: RLBatch, nll: NLLBatch | None) -> dict:
        """One optimizer step on L = L_RL + lambda * L_NLL (paper Eq. 10 + the NLL term)."""
        L = self.cfg.loss
        temperature = self.cfg.sampling.temperature
        self.model.train()
        ids, attn, mask = self.encode(rl.prompts, rl.completion_ids)  # [N, L], [N, L], [N, L-1]
        logps = self.token_logps(self.model, ids, attn, temperature)  # [N, L-1]
        ref = None
        if L.beta > 0:
            with torch.no_grad():
                ref = self.token_logps(self._reference(), ids, attn, temperature)
        # One optimizer step per batch (mini-batch = batch, as the paper): pi_old = pi_theta, detached.
        rl_loss, metrics = losses.policy_loss(
            L.policy_loss, logps, logps.detach(), rl.advantages.to(logps.dtype), mask,
            ref_per_token_logps=ref, beta=L.beta, epsilon=L.epsilon, epsilon_high=L.epsilon_high,
            max_completion_length=self.cfg.sampling.max_new_tokens)
        nll_loss = torch.zeros((), dtype=logps.dtype)
        n_nll = 0
        if nll is not None and nll.prompts and L.nll_coef > 0:
            n_ids, n_attn, n_mask = self.encode(nll.prompts, nll.target_ids)
            n_logps = self.token_logps(self.model, n_ids, n_attn, 1.0)
            nll_loss, _ = losses.nll_loss(n_logps, n_mask)
            n_nll = len(nll.prompts)
        loss = losses.total_loss(rl_loss, nll_loss, L.nll_coef)
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss is {loss.item()} (rl={rl_loss.item()}, nll={nll_loss.item()}): step refused")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"gradient norm is {grad_norm.item()}: step refused")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"loss": loss.item(), "rl_loss": rl_loss.item(), "nll_loss": float(nll_loss),
               "grad_norm": grad_norm.item(), "num_sequences": len(rl.prompts), "num_nll_sequences": n_nll}
        out.update({k: float(v) for k, v in metrics.items()})
        return out
