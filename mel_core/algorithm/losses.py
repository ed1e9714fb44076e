"""Advantage estimators, policy losses, the NLL term and L = L_RL + lambda * L_NLL (docs/DESIGN.md, "The algorithm", step 7).

Layout (after verl's ``core_algos.py``): small pure functions registered by name, and one function,
:func:`aggregate`, that owns every reduction of a per-token loss to a scalar. Plain torch; no prefect.

* ``ADVANTAGES[name](rewards [N], group_ids [N] long, **kw) -> advantages [N]``
  ``grpo`` | ``dr_grpo`` | ``batch`` | ``reinforce_pp`` | ``rft``
* ``POLICY_LOSSES[name](per_token_logps [B,T], old_per_token_logps [B,T], advantages [B],
  completion_mask [B,T], *, ref_per_token_logps=None, beta=0.0, epsilon=0.2, epsilon_high=None,
  max_completion_length=None) -> (loss scalar, metrics dict of floats)``
  ``grpo`` | ``bnpo`` | ``dr_grpo`` | ``dapo`` — all the per-token PPO clipped objective, differing only
  in aggregation. :func:`policy_loss` is the public entry point.
* :func:`nll_loss` (L_NLL on accepted meta-experience), :func:`total_loss` (the one place defining L).
* :func:`selective_log_softmax`, :func:`per_token_logps`: log-probs as TRL computes them.

Everything here is matched against TRL 1.16's ``GRPOTrainer`` (tests/test_trl_parity.py): the
advantage formulas come from ``_generate_and_score_completions`` and the per-token objective and
aggregations from ``_compute_loss`` (trl/trainer/grpo_trainer.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ADVANTAGES: dict[str, Callable[..., Tensor]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {}

# TRL adds 1e-4 to the std in GRPO's advantage normalisation; REINFORCE++ (OpenRLHF) uses 1e-8.
GRPO_STD_EPS = 1e-4
REINFORCE_PP_STD_EPS = 1e-8


def register_advantage(name: str):
    """Decorator: register ``fn(rewards, group_ids, **kw) -> advantages`` under ``name``."""

    def deco(fn):
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} registered twice")
        ADVANTAGES[name] = fn
        return fn

    return deco


def register_policy_loss(name: str):
    """Decorator: register a policy loss (signature of :func:`policy_loss` minus ``loss_type``)."""

    def deco(fn):
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} registered twice")
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def _lookup(registry: dict, name: str, what: str):
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown {what} {name!r}; known: {sorted(registry)}") from None


def get_advantage(name: str) -> Callable[..., Tensor]:
    """The estimator registered as ``name``; KeyError listing the known names otherwise."""
    return _lookup(ADVANTAGES, name, "advantage estimator")


def get_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """The policy loss registered as ``name``; KeyError listing the known names otherwise."""
    return _lookup(POLICY_LOSSES, name, "policy loss")


# ------------------------------------------------------------------------------------ advantages


def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample group mean and Bessel-corrected group std, broadcast back to samples. # [N], [N]

    Computed in TRL's order (``trl.trainer.utils.nanstd``): var = mean((r - mean)^2) * n / (n - 1);
    a group of one has no std (NaN), as in TRL, whose NaN advantage is then zeroed.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {tuple(rewards.shape)}, {tuple(group_ids.shape)}")
    ids = torch.unique(group_ids, return_inverse=True)[1]  # [N] in 0..K-1 (arbitrary ids allowed)
    k = int(ids.max()) + 1 if ids.numel() else 0
    count = torch.zeros(k, dtype=rewards.dtype, device=rewards.device).index_add_(0, ids, torch.ones_like(rewards))  # [K]
    mean = torch.zeros(k, dtype=rewards.dtype, device=rewards.device).index_add_(0, ids, rewards) / count  # [K]
    sq = (rewards - mean[ids]) ** 2  # [N]
    var = torch.zeros(k, dtype=rewards.dtype, device=rewards.device).index_add_(0, ids, sq) / count  # [K]
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan")))
    std = torch.sqrt(var * correction)  # [K]
    return mean[ids], std[ids]


def _batch_std(rewards: Tensor) -> Tensor:
    """Bessel-corrected std over the whole batch (0-dim), NaN-free: 0 for a batch of one (as TRL)."""
    if rewards.numel() <= 1:
        return torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    n = rewards.numel()
    return torch.sqrt(((rewards - rewards.mean()) ** 2).mean() * (n / (n - 1)))  # TRL's nanstd order


@register_advantage("grpo")
def grpo_advantage(rewards: Tensor, group_ids: Tensor, **kw) -> Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + 1e-4), std Bessel-corrected (TRL ``scale_rewards="group"``).

    All-equal groups give 0. A group of one gives 0 (TRL's NaN std, then ``nan_to_num``).
    """
    mean, std = _group_stats(rewards.float(), group_ids)  # [N], [N]
    adv = (rewards.float() - mean) / (std + GRPO_STD_EPS)  # [N]
    return torch.nan_to_num(adv, nan=0.0).to(rewards.dtype)


@register_advantage("dr_grpo")
def dr_grpo_advantage(rewards: Tensor, group_ids: Tensor, **kw) -> Tensor:
    """A_i = r_i - mean_g r (Dr. GRPO, Liu et al. 2025: no std scaling; TRL ``scale_rewards="none"``)."""
    mean, _ = _group_stats(rewards.float(), group_ids)
    return (rewards.float() - mean).to(rewards.dtype)  # [N]


@register_advantage("batch")
def batch_advantage(rewards: Tensor, group_ids: Tensor, **kw) -> Tensor:
    """A_i = (r_i - mean_g r) / (std_batch r + 1e-4): group baseline, batch-wide Bessel std
    (TRL ``scale_rewards="batch"``, after "Tricks or Traps? A Deep Dive into RL for LLM Reasoning")."""
    r = rewards.float()
    mean, _ = _group_stats(r, group_ids)
    return ((r - mean) / (_batch_std(r) + GRPO_STD_EPS)).to(rewards.dtype)  # [N]


@register_advantage("reinforce_pp")
def reinforce_pp_advantage(rewards: Tensor, group_ids: Tensor, **kw) -> Tensor:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262), outcome reward, gamma = 1, no reward-side KL:
    the return of every token is the sequence reward, normalised over the *global batch*
    ``A_i = (r_i - mean_batch r) / (std_batch r + 1e-8)``, std Bessel-corrected (torch ``.std()``,
    as OpenRLHF's implementation). ``group_ids`` is accepted for the common signature and unused.
    """
    r = rewards.float()
    return ((r - r.mean()) / (_batch_std(r) + REINFORCE_PP_STD_EPS)).to(rewards.dtype)  # [N]


@register_advantage("rft")
def rft_advantage(rewards: Tensor, group_ids: Tensor, *, correct_threshold: float = 1.0, **kw) -> Tensor:
    """Rejection-sampling fine-tuning: A_i = 1 if sample i verified correct (reward >= threshold) else 0.

    With the clipped objective at ratio 1 (pi_old = pi_theta), -min(ratio*A, clip(ratio)*A) has gradient
    -A * grad log pi, so the policy losses train NLL on the correct samples only; incorrect samples
    (A = 0) contribute nothing but still count in the denominator of the aggregation (``grpo``: each
    correct sequence weighs 1/B; token-mean losses: each correct token weighs 1/#tokens in batch).
    """
    return (rewards >= correct_threshold).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


# ---------------------------------------------------------------------------------- aggregation


def aggregate(per_token_loss: Tensor, mask: Tensor, mode: str, *, max_completion_length: int | None = None) -> Tensor:
    """The one place that reduces a per-token loss [B, T] to a scalar.

    * ``seq_mean_token_mean`` (grpo): mean over sequences of each sequence's masked token mean
      (the MEL paper's Eq. 10); each sequence counts once whatever its length.
    * ``token_mean`` (bnpo, dapo): sum over all masked tokens / number of masked tokens in the batch.
    * ``seq_sum_norm`` (dr_grpo): sum over all masked tokens / (B * max_completion_length), a constant
      normaliser (Dr. GRPO).
    Denominators are clamped at 1, as in TRL, so empty rows/batches give 0 rather than NaN.
    """
    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask  # [B, T]
    if mode == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if mode == "seq_sum_norm":
        if not max_completion_length:
            raise ValueError("dr_grpo aggregation needs max_completion_length")
        return masked.sum() / (per_token_loss.size(0) * max_completion_length)
    raise ValueError(f"unknown aggregation {mode!r}; known: ['seq_mean_token_mean', 'seq_sum_norm', 'token_mean']")


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    mask = mask.to(x.dtype)
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


# -------------------------------------------------------------------------------- policy losses


def _clipped_pg(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    aggregation: str,
    ref_per_token_logps: Tensor | None,
    beta: float,
    epsilon: float,
    epsilon_high: float | None,
    max_completion_length: int | None,
) -> tuple[Tensor, dict[str, float]]:
    """Per-token PPO clipped surrogate (+ beta * k3 KL), reduced by :func:`aggregate`.

    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps_high) * A) + beta * KL_t
    ratio_t = exp(logp_t - old_logp_t), KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (k3).
    """
    if per_token_logps.dim() != 2 or per_token_logps.shape != old_per_token_logps.shape \
            or per_token_logps.shape != completion_mask.shape:
        raise ValueError(
            f"per_token_logps, old_per_token_logps, completion_mask must all be [B, T]; got "
            f"{tuple(per_token_logps.shape)}, {tuple(old_per_token_logps.shape)}, {tuple(completion_mask.shape)}")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(per_token_logps.dtype)  # [B, T]
    adv = advantages.to(per_token_logps.dtype)
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv  # [B, 1] (or [B, T] per-token advantages)

    # Padding positions may hold arbitrary log-probs; zero their log-ratio so exp() cannot overflow into
    # inf * 0 = NaN. Identical to TRL on every real token.
    log_ratio = (per_token_logps - old_per_token_logps).masked_fill(mask == 0, 0.0)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # [B, T]
    per_token_loss = -torch.min(ratio * adv, clipped * adv)  # [B, T]

    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps")
        d = (ref_per_token_logps - per_token_logps).masked_fill(mask == 0, 0.0)  # [B, T]
        per_token_kl = torch.exp(d) - d - 1  # [B, T] k3 estimator, >= 0
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)

    loss = aggregate(per_token_loss, mask, aggregation, max_completion_length=max_completion_length)

    with torch.no_grad():  # as TRL: a token is clipped when the clip is the active branch of the min
        r = ratio.detach()
        low = (r < 1 - eps_low) & (adv < 0)  # [B, T]
        high = (r > 1 + eps_high) & (adv > 0)  # [B, T]
        metrics["clip_ratio/low"] = _masked_mean(low.float(), mask)
        metrics["clip_ratio/high"] = _masked_mean(high.float(), mask)
        metrics["clip_ratio"] = _masked_mean((low | high).float(), mask)
        metrics["ratio_mean"] = _masked_mean(r, mask)
        metrics["policy_loss"] = float(loss.detach())
        metrics["num_tokens"] = float(mask.sum())
    return loss, metrics


def _make_clipped_pg(name: str, aggregation: str, doc: str):
    def fn(per_token_logps, old_per_token_logps, advantages, completion_mask, *, ref_per_token_logps=None,
           beta=0.0, epsilon=0.2, epsilon_high=None, max_completion_length=None):
        return _clipped_pg(per_token_logps, old_per_token_logps, advantages, completion_mask,
                           aggregation=aggregation, ref_per_token_logps=ref_per_token_logps, beta=beta,
                           epsilon=epsilon, epsilon_high=epsilon_high, max_completion_length=max_completion_length)

    fn.__name__ = fn.__qualname__ = f"{name}_loss"
    fn.__doc__ = doc
    fn.aggregation = aggregation
    return register_policy_loss(name)(fn)


grpo_loss = _make_clipped_pg(
    "grpo", "seq_mean_token_mean",
    "Clipped PG, per-sequence token mean then mean over sequences (MEL Eq. 10; TRL loss_type='grpo').")
bnpo_loss = _make_clipped_pg(
    "bnpo", "token_mean",
    "Clipped PG, token mean over the (micro-)batch: sum over tokens / #tokens (TRL loss_type='bnpo').")
dr_grpo_loss = _make_clipped_pg(
    "dr_grpo", "seq_sum_norm",
    "Clipped PG, sum over tokens / (B * max_completion_length) (Dr. GRPO; TRL loss_type='dr_grpo').")
dapo_loss = _make_clipped_pg(
    "dapo", "token_mean",
    "Clipped PG with clip-higher (epsilon_high; None = epsilon, as TRL), token mean over the batch "
    "(DAPO; TRL loss_type='dapo'). TRL divides by the token count of the whole *generation* batch "
    "(all processes, all gradient-accumulation micro-batches); for one process and one micro-batch "
    "that is the token mean computed here.")


def policy_loss(
    loss_type: str,
    per_token_logps: Tensor,
    old_per_token_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    ref_per_token_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """L_RL by name. Shapes: logps/old/ref/mask [B, T], advantages [B]. Returns (scalar, metrics)."""
    return get_policy_loss(loss_type)(
        per_token_logps, old_per_token_logps, advantages, completion_mask,
        ref_per_token_logps=ref_per_token_logps, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
        max_completion_length=max_completion_length)


def micro_batch_weight(loss_type: str, micro_mask: Tensor, batch_mask: Tensor) -> float:
    """Weight of a micro-batch's loss so that the sum over micro-batches equals the loss of the whole
    batch (gradient accumulation that keeps the aggregation exact): sequence-normalised losses weigh
    by their share of sequences, token-mean losses by their share of tokens."""
    mode = get_policy_loss(loss_type).aggregation
    if mode == "token_mean":
        return float(micro_mask.sum()) / max(float(batch_mask.sum()), 1.0)
    return micro_mask.size(0) / batch_mask.size(0)


# ------------------------------------------------------------------------------------------ NLL


def nll_loss(per_token_logps: Tensor, target_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """L_NLL: token-averaged negative log-likelihood per sequence (tokens with target_mask = 0, e.g.
    the retrospective-context prompt, are ignored), then the mean over sequences. [M, T], [M, T] -> scalar.

    An empty batch (M == 0) gives a plain 0.0 tensor; a sequence with no target tokens counts as 0
    (its denominator is clamped at 1), so an all-masked batch gives a zero that keeps the grad path.
    """
    if per_token_logps.shape != target_mask.shape:
        raise ValueError(f"per_token_logps and target_mask must match, got "
                         f"{tuple(per_token_logps.shape)} vs {tuple(target_mask.shape)}")
    if per_token_logps.size(0) == 0:
        return torch.zeros((), dtype=per_token_logps.dtype, device=per_token_logps.device), \
            {"nll": 0.0, "num_sequences": 0.0, "num_tokens": 0.0}
    mask = target_mask.to(per_token_logps.dtype)  # [M, T]
    # masked_fill, not *, so -inf log-probs on masked (prompt/pad) positions cannot turn into NaN.
    per_seq = -(per_token_logps.masked_fill(mask == 0, 0.0) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [M]
    loss = per_seq.mean()
    return loss, {"nll": float(loss.detach()), "num_sequences": float(per_token_logps.size(0)),
                  "num_tokens": float(mask.sum())}


def nll_denominator(normalization: str, num_targets: int, batch_prompts: float) -> float:
    """What the summed per-target NLLs of one optimizer step are divided by (loss.nll_normalization): ``accepted``
    = the number of targets (their mean: one per accepted M, two in two_pass) | ``batch`` = B, the prompts of the
    step (``batch_prompts``: its share of them when the step is a mini-batch), the paper's Eq. 10 read literally.
    So batch = accepted x num_targets / B."""
    if normalization == "accepted":
        return float(max(num_targets, 1))
    if normalization == "batch":
        if batch_prompts <= 0:
            raise ValueError("batch normalization needs a positive number of prompts")
        return float(batch_prompts)
    raise ValueError(f"unknown NLL normalization {normalization!r}; known: ['accepted', 'batch']")


def nll_by_part(per_token_logps: Tensor, target_mask: Tensor, part_ids: Tensor, num_parts: int) -> tuple[Tensor, Tensor]:
    """Summed NLL and token count of each part of the targets (for logging, no grad): [M, T] log-probs, mask
    and part index per token -> ([num_parts] sums of -log p, [num_parts] token counts)."""
    with torch.no_grad():
        mask = target_mask.bool()
        nll = -per_token_logps.detach().masked_fill(~mask, 0.0).double()
        parts = part_ids.long().clamp(0, num_parts - 1)
        sums = torch.zeros(num_parts, dtype=torch.float64, device=nll.device).scatter_add_(0, parts[mask], nll[mask])
        counts = torch.zeros(num_parts, dtype=torch.float64, device=nll.device).scatter_add_(
            0, parts[mask], torch.ones_like(nll[mask]))
    return sums, counts


def total_loss(rl_loss: Tensor, nll_loss: Tensor, nll_coef: float) -> Tensor:
    """L = L_RL + lambda * L_NLL (MEL; lambda = 1 in the paper)."""
    return rl_loss + nll_coef * nll_loss


# ------------------------------------------------------------------------------------- log-probs


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log_softmax(logits).gather(-1, index) without materialising the [B, T, V] log-softmax.

    logits [B, T, V], index [B, T] -> [B, T]. fp32/fp64: gathered logit - logsumexp, row by row;
    lower precision: log_softmax per row (logsumexp is unstable in bf16). TRL's non-Triton path.
    """
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)  # [B, T]
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # [B, T], one row at a time
        return selected - lse
    rows = [F.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
            for row, idx in zip(logits, index)]
    return torch.stack(rows)  # [B, T]


def per_token_logps(model, input_ids: Tensor, attention_mask: Tensor, logits_to_keep: int,
                    temperature: float = 1.0, batch_size: int | None = None) -> Tensor:
    """log pi(x_t | x_<t) / temperature for the last ``logits_to_keep`` tokens. [B, L] -> [B, logits_to_keep]

    As TRL's ``_get_per_token_logps``: logits of positions L-K-1..L-2 predict tokens L-K..L-1, divided
    by the sampling temperature before the softmax. Positions with attention_mask = 0 are set to 0, as
    TRL 1.16's fused head returns them. ``batch_size`` chunks the forward to bound memory.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    out = []
    bs = batch_size or input_ids.size(0)
    for s in range(0, input_ids.size(0), bs):
        ids, am = input_ids[s:s + bs], attention_mask[s:s + bs]
        logits = model(input_ids=ids, attention_mask=am, logits_to_keep=logits_to_keep + 1).logits  # [b, K+1, V]
        logits = logits[:, :-1, :] / temperature  # [b, K, V] (drop the prediction past the end)
        targets = ids[:, -logits_to_keep:]  # [b, K]
        logps = selective_log_softmax(logits[:, -logits_to_keep:], targets)  # [b, K]
        out.append(logps.masked_fill(am[:, -logits_to_keep:] == 0, 0.0))
    return torch.cat(out, dim=0)  # [B, K]
