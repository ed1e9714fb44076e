"""Every update path takes every kind of step: constructed situations through the real stages.

A step with no accepted meta-experience is common (no mixed group, nothing parsed, nothing accepted), and
so are groups all right or all wrong; each update path — one process, micro-batched, PPO epochs and
mini-batches, FSDP on 2 processes, LoRA — must then train the RL term alone and record the step. The
situations are constructed (tests/scripted.py), not hoped for from the tiny model's output.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mel_core import config as C
from tests.conftest import assert_adam_steps_agree, build_micro_model
from tests.scripted import Script, run_step, scripted_runtime

pytestmark = pytest.mark.timeout(600)

PATHS = {
    "one_process": [],
    "micro_batched": ["optim.micro_batch_size=3"],
    "ppo_epochs": ["optim.epochs_per_step=2", "optim.mini_batch_size=8", "optim.micro_batch_size=4"],
    "fsdp_2": ["optim.fsdp_processes=2", "optim.micro_batch_size=3"],
    "lora": ["model.lora.enabled=true", "model.lora.r=4"],
}

_alternate = lambda q, i: i % 2 == 0
# name: (script, prompts per step, accepted analyses expected, whether any advantage is non-zero)
SITUATIONS = {
    "no_mixed_group": (Script(solved=lambda q, i: sum(map(ord, q)) % 2 == 0), 4, 0, False),
    "nothing_parsed": (Script(analysis=lambda q: "I compared them and they differ."), 4, 0, True),
    "nothing_accepted": (Script(replay_solves=lambda q: False), 4, 0, True),
    "all_correct": (Script(solved=lambda q, i: True), 4, 0, False),
    "all_wrong": (Script(solved=lambda q, i: False), 4, 0, False),
    "single_prompt": (Script(), 1, 1, True),
    "some_accepted": (Script(replay_solves=lambda q: sum(map(ord, q)) % 3 != 0), 4, None, True),
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return build_micro_model(tmp_path_factory.mktemp("micro-update-paths"), num_layers=2)


def _run_step(tmp_path, micro, situation: str, path: str):
    script, prompts, _, _ = SITUATIONS[situation]
    cfg = C.load("configs/tiny.yaml", [
        f"run.name={situation}-{path}", f"run.root_dir={tmp_path}", f"model.name_or_path={micro}",
        "run.torch_threads=1", f"sampling.prompts_per_step={prompts}", "sampling.group_size=4",
        "optim.lr=1e-3", *PATHS[path]])
    rt, base = scripted_runtime(cfg, script)
    return rt, base, run_step(rt, 1, base)


def _weights(path) -> dict:
    """The trained tensors a checkpoint holds: the adapters of a LoRA one, else the whole model."""
    adapter = Path(path) / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else Path(path) / "model.safetensors")


_REFERENCE: dict[str, tuple[dict, dict]] = {}


def _one_process(tmp_path_factory, micro, situation: str) -> tuple[dict, dict]:
    """(update row, weights) of the situation's step in one process, computed once per test session."""
    if situation not in _REFERENCE:
        rt, _, out = _run_step(tmp_path_factory.mktemp(f"ref-{situation}"), micro, situation, "one_process")
        _REFERENCE[situation] = (rt.store.query("SELECT * FROM updates")[0], _weights(out["checkpoint"].path))
    return _REFERENCE[situation]


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p == "fsdp_2" else p for p in PATHS])
@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_every_update_path_records_every_kind_of_step(tmp_path, tmp_path_factory, micro, situation, path):
    _, prompts, expected_accepted, signal = SITUATIONS[situation]
    rt, base, out = _run_step(tmp_path, micro, situation, path)
    update = rt.store.query("SELECT * FROM updates")[0]
    accepted = rt.store.query("SELECT count(*) AS n FROM analyses WHERE status = 'accepted'")[0]["n"]
    if expected_accepted is not None:
        assert accepted == expected_accepted
    else:
        assert 0 < accepted < prompts, "the control situation must accept some analyses and not all"
    links = rt.store.query("SELECT count(*) AS n FROM internalized")[0]["n"]
    assert update["num_sequences"] == prompts * 4
    assert update["num_nll_sequences"] == accepted and links == accepted
    assert (update["nll_loss"] is None) == (accepted == 0)  # the NLL of nothing is undefined, not 0
    assert update["checkpoint_out"] == out["checkpoint"].checkpoint_id != base.checkpoint_id
    weights = _weights(out["checkpoint"].path)
    assert all(torch.isfinite(t).all() for t in weights.values())
    if path == "lora":
        assert not (Path(out["checkpoint"].path) / "model.safetensors").exists(), "a LoRA checkpoint holds adapters only"
        start = {k: torch.zeros_like(v) for k, v in weights.items() if "lora_B" in k}  # B starts at 0
        moved = any(not torch.equal(weights[k], v) for k, v in start.items())
    else:
        initial = load_file(Path(micro) / "model.safetensors")
        moved = any(not torch.equal(weights[k], initial[k]) for k in weights)
    # AdamW moves no weight on an all-zero gradient: weights move iff the step has a learning signal
    assert moved == (signal or accepted > 0)
    if path in ("micro_batched", "fsdp_2"):  # the same step as one process, to float reduction order
        ref_update, ref_weights = _one_process(tmp_path_factory, micro, situation)
        for key in ("loss", "rl_loss", "nll_loss", "grad_norm"):
            expected = None if ref_update[key] is None else pytest.approx(ref_update[key], rel=1e-4, abs=1e-6)
            assert update[key] == expected, key
        if moved:  # a step with no gradient moved nothing, checked above
            assert_adam_steps_agree(weights, ref_weights, load_file(Path(micro) / "model.safetensors"), lr=1e-3)
