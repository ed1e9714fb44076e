"""The update stage on 2 processes with FSDP2 (torchrun, gloo on CPU) takes the step one process takes:
same weights, same stats, and the optimizer state it saves continues the next step the same way."""

import random

import pytest
import torch
from safetensors.torch import load_file

from mel_core import config as C
from mel_core.model import distributed
from mel_core.model.policy import NLLBatch, Policy, RLBatch
from tests.conftest import assert_adam_steps_agree, build_micro_model

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # torchrun


def _batch(tok, seed: int):
    rng = random.Random(seed)
    ids = [i for i in range(tok.vocab_size) if i not in tok.all_special_ids]
    prompts = [f"Q: {rng.randint(1, 20)}+{rng.randint(1, 20)}*{rng.randint(1, 9)} =" for _ in range(10)]
    completions = [[rng.choice(ids) for _ in range(rng.randint(2, 12))] for _ in prompts]  # ragged
    advantages = torch.tensor([rng.uniform(-1, 1) for _ in prompts])
    nll = NLLBatch(prompts=prompts[:3], target_ids=[[rng.choice(ids) for _ in range(rng.randint(3, 9))] for _ in range(3)])
    return RLBatch(prompts=prompts, completion_ids=completions, advantages=advantages), nll


def _weights(path):
    return load_file(f"{path}/model.safetensors")


def test_fsdp_update_equals_the_single_process_update(tmp_path):
    model = build_micro_model(tmp_path / "micro", num_layers=2)
    # 10 sequences in micro-batches of 4: 3 parts, so one rank also runs a zero-weight part
    cfg = C.load("configs/tiny.yaml", ["optim.lr=1e-3", "optim.micro_batch_size=4", "run.torch_threads=1",
                                       "optim.fsdp_processes=2"])
    single = Policy(cfg, model)
    steps = [_batch(single.tokenizer, seed) for seed in (0, 1)]

    start = model
    for k, (rl, nll) in enumerate(steps, start=1):
        expected = single.train_step(rl, nll)
        reference = single.save_checkpoint(tmp_path / f"single-{k}")
        out = tmp_path / f"fsdp-{k}"
        got = distributed.launch(C.to_dict(cfg), str(start), rl, nll, out, 2)
        for key in ("loss", "rl_loss", "nll_loss", "grad_norm"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
        assert got["num_sequences"] == 10 and got["num_nll_sequences"] == 3
        a, b = _weights(reference), _weights(out)
        assert a.keys() == b.keys()
        moved = [n for n in a if not torch.equal(a[n], _weights(start)[n])]
        assert moved, "the step changed no weight"
        print(f"step {k}: loss {got['loss']:.6f} vs {expected['loss']:.6f}")
        assert_adam_steps_agree(b, a, _weights(model), lr=1e-3, steps=k)
        # the saved optimizer state has the single-process layout: a one-process policy loads it
        Policy(cfg, out).load_checkpoint(out)
        start = out  # the next step starts from the distributed checkpoint (its optimizer state included)


def test_config_refuses_fsdp_with_lora():
    with pytest.raises(C.ConfigError, match="optim.fsdp_processes"):
        C.load("configs/tiny.yaml", ["optim.fsdp_processes=2", "model.lora.enabled=true"])


def test_a_mel_step_with_an_fsdp_update_records_what_a_single_process_step_records(tmp_path):
    """The stages with optim.fsdp_processes=2: same checkpoint id and weights, the flow's policy serves the
    new weights, and update rows and links as in one process. The step is constructed (tests/scripted.py):
    mixed groups whose analyses parse and whose replays solve, so there is meta-experience to internalize."""
    from tests.scripted import Script, run_step, scripted_runtime

    model = build_micro_model(tmp_path / "micro", num_layers=2)
    results = {}
    for n in (1, 2):
        cfg = C.load("configs/tiny.yaml", ["run.name=fsdp", f"run.root_dir={tmp_path / str(n)}", "run.torch_threads=1",
                                           f"model.name_or_path={model}", "sampling.prompts_per_step=4",
                                           "sampling.group_size=4", "optim.lr=1e-3", f"optim.fsdp_processes={n}"])
        rt, base = scripted_runtime(cfg, Script())
        out = run_step(rt, 1, base)
        served = {k: v.detach().clone() for k, v in rt.policy.model.state_dict().items()}
        results[n] = (out, rt.store.query("SELECT update_id, num_sequences, num_nll_sequences FROM updates"),
                      rt.store.query("SELECT * FROM internalized ORDER BY heuristic_id"), served)
    (one, one_rows, one_links, _), (two, two_rows, two_links, two_served) = results[1], results[2]
    assert two["checkpoint"].checkpoint_id == one["checkpoint"].checkpoint_id and two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one_rows == two_rows and one_links == two_links and len(one_links) == 4  # one accepted M per prompt
    a, b = _weights(one["checkpoint"].path), _weights(two["checkpoint"].path)
    assert_adam_steps_agree(b, a, _weights(model), lr=1e-3)
    # the flow's policy moved to the checkpoint the torchrun group wrote
    assert all(torch.equal(two_served[n], b[n]) for n in b)


def test_fsdp_steps_float32_master_weights_under_bfloat16_compute(tmp_path):
    """bfloat16 compute over float32 master weights on 2 processes (MixedPrecisionPolicy: bfloat16 all-gathers,
    float32 gradient reduction): the shards, the saved weights and the saved AdamW state stay float32, so an lr-1e-6
    step moves the weights one process moves. Not bit-equal to one process: there autocast keeps norm weights and
    the residual stream float32 (mel_core/model/distributed.py), so the loss agrees to bfloat16 rounding."""
    model = build_micro_model(tmp_path / "micro", num_layers=2)
    cfg = C.load("configs/tiny.yaml", ["optim.lr=1e-6", "optim.micro_batch_size=4", "run.torch_threads=1",
                                       "optim.fsdp_processes=2", "model.dtype=bfloat16", "model.master_dtype=float32"])
    single = Policy(cfg, model)
    rl, nll = _batch(single.tokenizer, 0)
    expected = single.train_step(rl, nll)
    reference = _weights(single.save_checkpoint(tmp_path / "single"))
    got = distributed.launch(C.to_dict(cfg), str(model), rl, nll, tmp_path / "fsdp", 2)
    assert got["loss"] == pytest.approx(expected["loss"], rel=2e-2)
    weights, start = _weights(tmp_path / "fsdp"), _weights(model)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    state = torch.load(tmp_path / "fsdp" / "optimizer.pt", weights_only=True)["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}
    moved = agree = 0
    for name, ref in reference.items():
        step_ref, step = ref - start[name], weights[name] - start[name]
        clear = step_ref.abs() >= 0.9e-6  # one process moved it a full Adam step: a clear gradient
        moved += int(clear.sum())
        agree += int((torch.sign(step) == torch.sign(step_ref))[clear].sum())
    print(f"loss {got['loss']:.6f} vs {expected['loss']:.6f}; same direction on {agree}/{moved} weights")
    assert moved > 0.5 * sum(t.numel() for t in reference.values())
    assert agree >= 0.95 * moved
