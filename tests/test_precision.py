"""Master weights: float32 weights and AdamW state under bfloat16 compute (model.master_dtype, model.dtype).

At the paper's lr 1e-6 an AdamW step moves a weight by ~lr, far below half a bfloat16 ulp of a typical weight
(6e-5 for |w| in [0.016, 0.031)), so a policy whose weights are bfloat16 loses most of each update to rounding.
These tests take real optimizer steps on the micro model and read what the saved checkpoints hold; nothing here
depends on what the model generates.
"""

import random

import pytest
import torch
from safetensors.torch import load_file

from mel_core import config as C
from mel_core.model.checkpoints import OPTIMIZER_FILE
from mel_core.model.engines.base import SamplingParams
from mel_core.model.policy import NLLBatch, Policy, RLBatch
from mel_core.step.runtime import Runtime

pytestmark = pytest.mark.timeout(600)


def _cfg(*overrides):
    return C.load("configs/tiny.yaml", ["optim.lr=1e-6", "model.device=cpu", *overrides])


def _batch(tok, seed: int = 0):
    rng = random.Random(seed)
    ids = [i for i in range(tok.vocab_size) if i not in tok.all_special_ids]
    prompts = [f"Q: {rng.randint(1, 20)}+{rng.randint(1, 20)}*{rng.randint(1, 9)} =" for _ in range(8)]
    completions = [[rng.choice(ids) for _ in range(rng.randint(4, 16))] for _ in prompts]
    advantages = torch.tensor([rng.uniform(-1, 1) for _ in prompts])
    nll = NLLBatch(prompts=prompts[:2], target_ids=[[rng.choice(ids) for _ in range(8)] for _ in range(2)])
    return RLBatch(prompts=prompts, completion_ids=completions, advantages=advantages), nll


def _moved_between_two_steps(policy: Policy, tmp_path) -> tuple[float, set]:
    """Two optimizer steps on the same batch, each saved; the fraction of weights that differ between the two saved
    checkpoints, over the weights AdamW's step 2 moves in exact arithmetic: those with a non-zero first moment.
    (A weight whose gradient was exactly 0 at both steps — the embedding row of a token the batch never shows —
    has m = 0 and is not moved by any precision.) Also returns the saved weights' dtypes."""
    rl, nll = _batch(policy.tokenizer)
    saved = []
    for k in (1, 2):
        policy.train_step(rl, nll)
        saved.append(policy.save_checkpoint(tmp_path / f"step-{k}"))
    first, second = load_file(saved[0] / "model.safetensors"), load_file(saved[1] / "model.safetensors")
    state = torch.load(saved[1] / OPTIMIZER_FILE, weights_only=True)["state"]
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]  # the optimizer's parameter order
    moved = should = 0
    for i, name in enumerate(names):
        live = state[i]["exp_avg"] != 0  # [same shape as the weight]
        should += int(live.sum())
        moved += int((first[name] != second[name])[live].sum())
    return moved / should, {t.dtype for t in second.values()}


def test_float32_master_weights_take_the_steps_bfloat16_weights_round_away(micro_model, tmp_path):
    mixed = Policy(_cfg("model.dtype=bfloat16", "model.master_dtype=float32"), micro_model)
    fraction, dtypes = _moved_between_two_steps(mixed, tmp_path / "mixed")
    pure = Policy(_cfg("model.dtype=bfloat16", "model.master_dtype=bfloat16"), micro_model)
    pure_fraction, pure_dtypes = _moved_between_two_steps(pure, tmp_path / "pure")
    print(f"weights moved by step 2 at lr 1e-6: float32 master {fraction:.4f}, bfloat16 {pure_fraction:.4f}")
    assert dtypes == {torch.float32} and pure_dtypes == {torch.bfloat16}
    assert fraction >= 0.9
    assert pure_fraction < 0.5  # the bug master weights fix: the update is below half a bf16 ulp of most weights


def test_every_forward_runs_in_the_compute_dtype_over_float32_weights(micro_model, tmp_path):
    """The update's forwards (RL and NLL) and the campaign's generation engine all compute in bfloat16 while the
    weights, their gradients and AdamW's moments stay float32: sampling sees the numerics the update's log-probs use."""
    rt = Runtime(_cfg("model.dtype=bfloat16", f"model.name_or_path={micro_model}", f"run.root_dir={tmp_path}"))
    rt.ensure_version(rt.base_checkpoint)
    policy = rt.policy
    seen = []
    hook = policy.model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    grads = []
    for p in policy.model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.dtype))
    try:
        rl, nll = _batch(policy.tokenizer)
        policy.train_step(rl, nll)
        assert seen and set(seen) == {torch.bfloat16}
        assert set(grads) == {torch.float32}
        seen.clear()
        rt.engine.generate(["Q: 1+2 ="], SamplingParams(n=2, temperature=1.0, max_new_tokens=4, seed=0))
        assert seen and set(seen) == {torch.bfloat16}
    finally:
        hook.remove()
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in policy.optimizer.state.values()} == {torch.float32}
    # what the vLLM engine is handed after an update: the weights rounded to the dtype it serves in
    assert {w.dtype for _, w in policy.named_weights()} == {torch.bfloat16}


def test_a_checkpoint_resumes_with_the_same_float32_weights_and_optimizer_state(micro_model, tmp_path):
    cfg = _cfg("model.dtype=bfloat16")
    trained = Policy(cfg, micro_model)
    rl, nll = _batch(trained.tokenizer)
    trained.train_step(rl, nll)
    path = trained.save_checkpoint(tmp_path / "step-1")

    resumed = Policy(cfg, path)
    resumed.load_checkpoint(path)
    for (name, a), (_, b) in zip(trained.model.named_parameters(), resumed.model.named_parameters()):
        assert b.dtype == torch.float32 and torch.equal(a, b), name
    saved, loaded = trained.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for i in saved["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert loaded["state"][i][key].dtype == saved["state"][i][key].dtype
            assert torch.equal(loaded["state"][i][key], saved["state"][i][key]), (i, key)
    # and the next step is the one the uninterrupted run takes, bit for bit
    rl2, nll2 = _batch(trained.tokenizer, seed=1)
    assert trained.train_step(rl2, nll2) == resumed.train_step(rl2, nll2)
    for (name, a), (_, b) in zip(trained.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
