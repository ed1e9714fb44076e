"""Parity of mel_core.algorithm.losses with TRL 1.16's GRPOTrainer on a tiny Qwen2 (CPU, fp32, no downloads).

* Policy losses: TRL's private ``GRPOTrainer._compute_loss(model, inputs)`` on hand-made ragged inputs
  (left-padded prompts, right-padded completions, pi_old far from pi_theta so that clipping is active)
  against ``losses.policy_loss`` fed with ``losses.per_token_logps`` of the same model: loss values and
  parameter gradients.
* Advantages: TRL has no standalone advantage function; the formula is inline in
  ``GRPOTrainer._generate_and_score_completions``. We call that method itself (it generates with the
  tiny model, scores with a reward function that returns rewards we chose) and compare its
  ``advantages`` with ours for ``scale_rewards`` = "group" (grpo), "batch" (batch), "none" (dr_grpo).
"""
from __future__ import annotations

import pytest
import torch

from mel_core.algorithm import losses


def group_ids(num_prompts: int, group_size: int) -> torch.Tensor:
    """Group ids of contiguous groups of rollouts, as the update stage builds them: [0,0,..,1,1,..]. # [N]"""
    return torch.arange(num_prompts, dtype=torch.long).repeat_interleave(group_size)

trl = pytest.importorskip("trl")
assert trl.__version__ == "1.16.0", f"parity pinned to trl 1.16.0, found {trl.__version__}"

TOL = 1e-6
G = 4  # num_generations
MAX_COMPLETION = 7
TEMPERATURE = 0.7
MEASURED: dict[str, float] = {}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(297)})  # vocab 300
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = Qwen2ForCausalLM(cfg)
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")), use_cpu=True, use_vllm=False, report_to="none",
        bf16=False,  # else TRL autocasts to bf16 on CPU and its log-probs drift ~1e-3 from fp32
        per_device_train_batch_size=G, num_generations=G, max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE, save_strategy="no", logging_steps=1,
        use_bias_correction_kl=False,  # TRL 1.16 default True multiplies k3 by the ratio; we use plain k3
    )
    rewards_queue: list[list[float]] = []

    def reward_fn(completions, **kw):  # returns the rewards the test chose for this call
        return rewards_queue.pop(0)

    tr = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args,
                     train_dataset=Dataset.from_dict({"prompt": ["w1 w2 w3"] * G}), processing_class=_tokenizer())
    assert tr.args.steps_per_generation == 1 and tr.accelerator.num_processes == 1
    tr.current_gradient_accumulation_steps = 1  # set by Trainer.train(); one micro-batch per optimizer step
    tr._rewards_queue = rewards_queue
    return tr


@pytest.fixture(scope="module")
def batch():
    """Ragged hand-made batch: B=6, left-padded prompts (len <= 5), right-padded completions (len <= 7)."""
    g = torch.Generator().manual_seed(1)
    B, P, T = 6, 5, MAX_COMPLETION
    prompt_lens = [5, 3, 4, 2, 5, 1]
    comp_lens = [7, 3, 5, 1, 6, 4]
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_ids = torch.zeros(B, T, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, comp_lens)):
        prompt_ids[i, P - p:] = torch.randint(3, 300, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        completion_ids[i, :c] = torch.randint(3, 300, (c,), generator=g)
        completion_mask[i, :c] = 1
    advantages = torch.randn(B, generator=g)
    advantages[0] = 0.0  # an all-equal group's zero advantage
    # Log-ratio offsets in [-1, 1]: ratios from e^-1 to e^1, far outside [0.8, 1.28] on most tokens.
    old_offset = (torch.rand(B, T, generator=g) * 2 - 1)
    ref_offset = (torch.rand(B, T, generator=g) * 2 - 1) * 0.5
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=advantages,
                old_offset=old_offset, ref_offset=ref_offset)


def _ours(model, batch):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    return losses.per_token_logps(model, ids, am, batch["completion_ids"].size(1), TEMPERATURE)  # [B, T]


CASES = [(lt, beta) for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04)]


@pytest.mark.parametrize("loss_type,beta", CASES, ids=[f"{lt}-beta{b}" for lt, b in CASES])
def test_policy_loss_matches_trl(trainer, batch, loss_type, beta):
    model = trainer.model
    model.train()
    epsilon_high = 0.28 if loss_type == "dapo" else 0.2
    with torch.no_grad():
        base = _ours(model, batch)
    mask = batch["completion_mask"].float()
    old = (base + batch["old_offset"]) * mask  # fixed tensors, no grad
    ref = (base + batch["ref_offset"]) * mask
    params = [p for p in model.parameters() if p.requires_grad]

    # TRL
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.epsilon_low, trainer.epsilon_high = 0.2, epsilon_high
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
    inputs["old_per_token_logps"] = old
    inputs["num_items_in_batch"] = batch["completion_mask"].sum()
    if beta:
        inputs["ref_per_token_logps"] = ref
    try:
        trl_loss = trainer._compute_loss(model, inputs)
    finally:  # restore the fixture's defaults (generation with beta != 0 would need a reference model)
        trainer.loss_type, trainer.beta, trainer.epsilon_high = "grpo", 0.0, 0.2
    trl_grads = torch.autograd.grad(trl_loss, params)

    # ours
    logps = _ours(model, batch)
    our_loss, metrics = losses.policy_loss(
        loss_type, logps, old, batch["advantages"], batch["completion_mask"],
        ref_per_token_logps=ref if beta else None, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
        max_completion_length=MAX_COMPLETION)
    our_grads = torch.autograd.grad(our_loss, params)

    delta = abs(our_loss.item() - trl_loss.item())
    grad_delta = max((a - b).abs().max().item() for a, b in zip(our_grads, trl_grads))
    grad_scale = max(b.abs().max().item() for b in trl_grads)
    MEASURED[f"{loss_type} beta={beta}"] = delta
    print(f"{loss_type} beta={beta}: ours={our_loss.item():.8f} trl={trl_loss.item():.8f} |Δ|={delta:.2e} "
          f"max|Δgrad|={grad_delta:.2e} (max|grad|={grad_scale:.2e}) clip_ratio={metrics['clip_ratio']:.3f}")
    assert delta <= TOL
    assert grad_delta <= 1e-5 * max(1.0, grad_scale)
    assert metrics["clip_ratio"] > 0.1  # the inputs do exercise clipping
    # Our clip metric is TRL's clip_ratio/region_mean for this call.
    assert metrics["clip_ratio"] == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][-1], abs=1e-6)
    if beta:
        assert metrics["kl"] == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-6)


def test_per_token_logps_match_trl(trainer, batch):
    """Our logits/temperature + selective_log_softmax vs TRL's fused chunked LM head."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    T = batch["completion_ids"].size(1)
    with torch.no_grad():
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, T)
        ours = losses.per_token_logps(trainer.model, ids, am, T, TEMPERATURE)
    delta = (ours - theirs).abs().max().item()
    MEASURED["per_token_logps"] = delta
    print(f"per_token_logps max|Δ|={delta:.2e}")
    assert delta <= 1e-5
    assert torch.all(ours[batch["completion_mask"] == 0] == 0)


REWARDS = [1.0, 0.0, 0.0, 1.0,   # mixed group
           1.0, 1.0, 1.0, 1.0,   # all equal -> 0
           0.5, 0.2, 0.9, 0.0,   # graded
           0.0, 0.0, 0.0, 1.0]   # one correct


@pytest.mark.parametrize("scale_rewards,name", [("group", "grpo"), ("batch", "batch"), ("none", "dr_grpo")])
def test_advantages_match_trl(trainer, scale_rewards, name):
    assert trainer.beta == 0.0
    trainer.scale_rewards = scale_rewards
    trainer._rewards_queue.append(list(REWARDS))
    n_prompts = len(REWARDS) // G
    inputs = [{"prompt": f"w{i} w{i + 1} w{i + 2}"} for i in range(n_prompts) for _ in range(G)]
    torch.manual_seed(0)
    with torch.no_grad():
        out = trainer._generate_and_score_completions(inputs)
    trainer.scale_rewards = "group"
    theirs = out["advantages"]
    ours = losses.ADVANTAGES[name](torch.tensor(REWARDS), group_ids(n_prompts, G))
    delta = (ours - theirs).abs().max().item()
    MEASURED[f"advantage {name}"] = delta
    print(f"advantage {name} (scale_rewards={scale_rewards}): max|Δ|={delta:.2e}")
    assert delta <= TOL


def test_report_measured():
    """Prints the table of measured |Δ| (run with -s to see it)."""
    for k, v in MEASURED.items():
        print(f"  {k:24s} |Δ| = {v:.2e}")
