"""Hand-computed cases for mel_core.algorithm.losses (advantages, clipped PG + aggregations, NLL, log-probs)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from mel_core.algorithm import losses


def group_ids(num_prompts: int, group_size: int) -> torch.Tensor:
    """Group ids of contiguous groups of rollouts, as the update stage builds them: [0,0,..,1,1,..]. # [N]"""
    return torch.arange(num_prompts, dtype=torch.long).repeat_interleave(group_size)

EPS = losses.GRPO_STD_EPS


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ------------------------------------------------------------------------------------ registries


def test_registries_hold_the_named_functions():
    assert set(losses.ADVANTAGES) == {"grpo", "dr_grpo", "batch", "reinforce_pp", "rft"}
    assert set(losses.POLICY_LOSSES) == {"grpo", "bnpo", "dr_grpo", "dapo"}


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="bnpo.*dapo.*dr_grpo.*grpo"):
        losses.policy_loss("ppo", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1))
    with pytest.raises(KeyError, match="batch.*dr_grpo.*grpo.*reinforce_pp.*rft"):
        losses.get_advantage("gae")
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        losses.aggregate(torch.zeros(1, 1), torch.ones(1, 1), "sum")
    with pytest.raises(ValueError, match="twice"):
        losses.register_advantage("grpo")(lambda r, g: r)


# ------------------------------------------------------------------------------------ advantages


def test_grpo_advantage_bessel_std_and_constant_groups():
    r = t([1, 0, 0, 1, 1, 1, 1, 1])
    adv = losses.ADVANTAGES["grpo"](r, group_ids(2, 4))
    # group 0: mean 0.5, Bessel std = sqrt((4 * 0.25) / 3) = sqrt(1/3) (population std would be 0.5)
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-6)
    # group ids need not be contiguous nor start at 0
    adv2 = losses.ADVANTAGES["grpo"](t([1, 1, 0, 1, 0, 1, 1, 1]), torch.tensor([5, 9, 5, 9, 5, 9, 5, 9]))
    assert adv2.tolist() == pytest.approx([a, 0, -a, 0, -a, 0, a, 0], abs=1e-6)


def test_grpo_advantage_graded_rewards_and_singleton_group():
    r = t([0.5, 0.2, 0.9])
    m = (0.5 + 0.2 + 0.9) / 3
    std = math.sqrt(sum((x - m) ** 2 for x in (0.5, 0.2, 0.9)) / 2)
    adv = losses.ADVANTAGES["grpo"](r, torch.zeros(3, dtype=torch.long))
    assert adv.tolist() == pytest.approx([(x - m) / (std + EPS) for x in (0.5, 0.2, 0.9)], abs=1e-6)
    # a group of one has no std: TRL's NaN becomes 0, never NaN
    assert losses.ADVANTAGES["grpo"](t([1.0]), torch.zeros(1, dtype=torch.long)).tolist() == [0.0]


def test_dr_grpo_advantage_no_std():
    adv = losses.ADVANTAGES["dr_grpo"](t([1, 0, 0, 1, 1, 1, 1, 0]), group_ids(2, 4))
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_batch_advantage_group_mean_batch_std():
    # group means 0.5 and 1 -> centred [0.5, -0.5, 0, 0]; batch mean 0.75, Bessel var 0.75 / 3 = 0.25 -> std 0.5
    adv = losses.ADVANTAGES["batch"](t([1, 0, 1, 1]), group_ids(2, 2))
    assert adv.tolist() == pytest.approx([0.5 / (0.5 + EPS), -0.5 / (0.5 + EPS), 0, 0], abs=1e-6)


def test_reinforce_pp_global_batch_normalisation():
    # batch mean 0.25, Bessel std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    r = t([1, 0, 0, 0])
    for gids in (group_ids(2, 2), group_ids(1, 4)):  # groups are ignored
        adv = losses.ADVANTAGES["reinforce_pp"](r, gids)
        assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-6)


def test_rft_advantage_is_correctness_indicator():
    adv = losses.ADVANTAGES["rft"](t([1, 0, 0.5, 1]), group_ids(1, 4))
    assert adv.tolist() == [1.0, 0.0, 0.0, 1.0]
    adv = losses.ADVANTAGES["rft"](t([1, 0, 0.5, 1]), group_ids(1, 4), correct_threshold=0.5)
    assert adv.tolist() == [1.0, 0.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------- aggregation


def test_aggregate_by_hand():
    x = t([[1, 2, 3], [4, 5, 6]])
    m = t([[1, 1, 0], [1, 0, 0]])
    assert losses.aggregate(x, m, "seq_mean_token_mean").item() == pytest.approx((1.5 + 4) / 2)
    assert losses.aggregate(x, m, "token_mean").item() == pytest.approx(7 / 3)
    assert losses.aggregate(x, m, "seq_sum_norm", max_completion_length=5).item() == pytest.approx(7 / 10)
    with pytest.raises(ValueError, match="max_completion_length"):
        losses.aggregate(x, m, "seq_sum_norm")
    # an all-masked batch reduces to 0, not NaN
    assert losses.aggregate(x, torch.zeros_like(m), "token_mean").item() == 0.0


def test_policy_losses_on_ragged_mask_grpo_differs_from_bnpo():
    # on-policy (ratio 1): per-token loss = -A. Sequence 0 has 3 tokens, sequence 1 has 1.
    logp = t([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    adv = t([1.0, -1.0])
    got = {name: losses.policy_loss(name, logp, logp, adv, mask, max_completion_length=4)[0].item()
           for name in losses.POLICY_LOSSES}
    assert got["grpo"] == pytest.approx((-1 + 1) / 2)  # mean of per-sequence means
    assert got["bnpo"] == pytest.approx((-3 + 1) / 4)  # mean over the 4 tokens
    assert got["dapo"] == pytest.approx((-3 + 1) / 4)
    assert got["dr_grpo"] == pytest.approx((-3 + 1) / (2 * 4))  # sum / (B * max_completion_length)
    assert got["grpo"] != got["bnpo"]
    with pytest.raises(ValueError, match="max_completion_length"):
        losses.policy_loss("dr_grpo", logp, logp, adv, mask)


# ------------------------------------------------------------------------------------- clipping


def _one_token_batch(log_ratios, advs):
    logp = torch.zeros(len(log_ratios), 1, requires_grad=True)  # [B, 1]
    old = -t(log_ratios).unsqueeze(1)  # ratio = exp(logp - old) = exp(log_ratio)
    return logp, old, t(advs), torch.ones(len(log_ratios), 1)


def test_clipping_values_metrics_and_vanishing_gradient():
    e = math.e
    # tokens: (ratio e, A=+1) clipped at 1.2; (e, -1) unclipped; (1/e, +1) unclipped; (1/e, -1) clipped at 0.8
    logp, old, adv, mask = _one_token_batch([1, 1, -1, -1], [1, -1, 1, -1])
    loss, metrics = losses.policy_loss("bnpo", logp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 + e - 1 / e + 0.8) / 4, abs=1e-6)
    assert metrics["clip_ratio"] == pytest.approx(0.5)
    assert metrics["clip_ratio/high"] == pytest.approx(0.25) and metrics["clip_ratio/low"] == pytest.approx(0.25)
    assert metrics["ratio_mean"] == pytest.approx((2 * e + 2 / e) / 4, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, logp)
    # d(-ratio*A)/dlogp = -ratio*A on unclipped tokens; 0 where the clipped branch is active
    assert grad.squeeze(1).tolist() == pytest.approx([0.0, e / 4, -1 / e / 4, 0.0], abs=1e-6)


def test_dapo_clip_higher():
    logp, old, adv, mask = _one_token_batch([math.log(1.25)], [1.0])  # ratio 1.25, A > 0
    loss, m = losses.policy_loss("dapo", logp, old, adv, mask, epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and m["clip_ratio"] == 0.0  # within 1 + 0.28
    assert torch.autograd.grad(loss, logp)[0].item() == pytest.approx(-1.25)
    loss, m = losses.policy_loss("dapo", logp, old, adv, mask, epsilon=0.2)  # epsilon_high None -> 0.2
    assert loss.item() == pytest.approx(-1.2) and m["clip_ratio"] == 1.0
    assert torch.autograd.grad(loss, logp)[0].item() == 0.0


def test_kl_term_k3():
    logp = t([[-1.0, -2.0, -3.0]])
    ref = t([[-1.5, -1.0, 50.0]])  # last token is padding: must not contribute (exp(53) would dominate)
    mask = t([[1, 1, 0]])
    d = [-0.5, 1.0]
    k3 = [math.exp(x) - x - 1 for x in d]
    loss, m = losses.policy_loss("bnpo", logp, logp, t([0.0]), mask, ref_per_token_logps=ref, beta=0.1)
    assert m["kl"] == pytest.approx(sum(k3) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, rel=1e-6)
    assert "kl" not in losses.policy_loss("bnpo", logp, logp, t([0.0]), mask)[1]
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        losses.policy_loss("grpo", logp, logp, t([0.0]), mask, beta=0.1)


def test_padding_with_extreme_logps_stays_finite():
    logp = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    old = t([[-1.0, -1e4]])  # padding position: exp(1e4) = inf if it were not masked
    loss, m = losses.policy_loss("grpo", logp, old, t([1.0]), t([[1, 0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    assert m["ratio_mean"] == pytest.approx(1.0)


def test_rft_trains_nll_on_correct_samples_only():
    torch.manual_seed(0)
    logp = (-torch.rand(4, 5)).requires_grad_()  # [B, T]
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = losses.ADVANTAGES["rft"](t([1, 0, 1, 0]), group_ids(1, 4))
    loss, _ = losses.policy_loss("grpo", logp, logp.detach(), adv, mask)
    (g_pg,) = torch.autograd.grad(loss, logp)
    correct = adv.unsqueeze(1)
    nll_correct = -((logp * mask * correct).sum(-1) / mask.sum(-1)).sum() / 4  # 1/B per correct sequence
    (g_nll,) = torch.autograd.grad(nll_correct, logp)
    assert torch.allclose(g_pg, g_nll, atol=1e-7)
    assert torch.all(g_pg[1] == 0) and torch.all(g_pg[3] == 0)


def test_shape_checks():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        losses.policy_loss("grpo", torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ------------------------------------------------------------------------------------------ NLL


def test_nll_masks_prompt_tokens():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-5.0, -6.0, 0.0, 0.0]], requires_grad=True)
    target = t([[0, 1, 1, 0], [0, 1, 0, 0]])  # prompt at position 0; padding after the target
    loss, m = losses.nll_loss(logp, target)
    assert loss.item() == pytest.approx(((2 + 3) / 2 + 6) / 2)
    assert m["num_tokens"] == 3 and m["num_sequences"] == 2
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[0, 3] == 0
    assert logp.grad[0, 1].item() == pytest.approx(-1 / 4) and logp.grad[1, 1].item() == pytest.approx(-1 / 2)
    # prompt log-probs do not matter, even -inf
    other = logp.detach().clone()
    other[:, 0] = -float("inf")
    assert losses.nll_loss(other, target)[0].item() == pytest.approx(loss.item())


def test_nll_empty_batch():
    loss, m = losses.nll_loss(torch.zeros(0, 7), torch.zeros(0, 7))
    assert loss.item() == 0.0 and loss.dim() == 0 and m["num_sequences"] == 0
    # all targets masked: zero that keeps the graph
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    loss, _ = losses.nll_loss(logp, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(logp.grad == 0)


def test_total_loss():
    assert losses.total_loss(t(1.5), t(2.0), 0.5).item() == pytest.approx(2.5)
    assert losses.total_loss(t(1.5), t(2.0), 0.0).item() == pytest.approx(1.5)


# ------------------------------------------------------------------------------------- log-probs


def test_selective_log_softmax_matches_naive():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    index = torch.randint(0, 11, (3, 5))
    naive = torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(losses.selective_log_softmax(logits, index), naive, atol=1e-6)
    bf = losses.selective_log_softmax(logits.bfloat16(), index)
    assert bf.dtype == torch.bfloat16 and torch.allclose(bf.float(), naive, atol=0.1)


class _ToyLM(torch.nn.Module):
    """logits depend on the token only: model(ids).logits[b, t] = table[ids[b, t]]."""

    def __init__(self, vocab=13):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        logits = self.table(input_ids)  # [B, L, V]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_per_token_logps_last_k_with_temperature():
    torch.manual_seed(0)
    model = _ToyLM()
    ids = torch.randint(0, 13, (3, 6))
    am = torch.ones(3, 6, dtype=torch.long)
    am[1, -2:] = 0  # right padding of a completion
    K, temp = 4, 0.7
    got = losses.per_token_logps(model, ids, am, K, temp)  # [B, K]
    full = (model.table(ids)[:, :-1] / temp).log_softmax(-1)  # predicts ids[:, 1:]
    want = torch.gather(full, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[:, -K:]
    want[1, -2:] = 0.0
    assert got.shape == (3, K)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(losses.per_token_logps(model, ids, am, K, temp, batch_size=2), got)
    with pytest.raises(ValueError):
        losses.per_token_logps(model, ids, am, K, 0.0)
