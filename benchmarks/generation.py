"""Generation throughput: our HF engine's generated tokens/s ÷ raw transformers `generate` on the same prompts.

The engine adds prompt expansion (n samples per prompt), chunking, seeding and per-completion
bookkeeping (eos trimming, decoding) around `model.generate`; this measures what that costs. Both sides
sample with the same parameters (temperature 1, top_k=0) on the tiny warm-started model and count the
tokens each generated up to and including eos.

    .venv/bin/python benchmarks/generation.py [--prompts 32 --n 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._doc import write_section  # noqa: E402
from mel_core import config as C
from mel_core.model.engines.base import SamplingParams
from mel_core.step.runtime import Runtime


def raw_generate(model, tok, prompts: list[str], params: SamplingParams) -> int:
    """transformers' generate on the same expanded batch; generated tokens up to and including eos."""
    expanded = [p for p in prompts for _ in range(params.n)]
    enc = tok(expanded, return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(params.seed)
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=params.max_new_tokens, do_sample=True,
                              temperature=params.temperature, top_k=0, top_p=params.top_p,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = seqs[:, enc["input_ids"].shape[1]:]
    is_eos = (new == tok.eos_token_id).int()
    # tokens before the first eos, plus the eos itself when there is one
    before_eos = (is_eos.cumsum(1) == 0).sum(1)
    return int((before_eos + is_eos.any(1).int()).sum())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="mel-gen-") as d:
        rt = Runtime(C.load("configs/tiny.yaml", ["run.name=gen-bench", f"run.root_dir={d}",
                                                  f"sampling.prompts_per_step={a.prompts}"]))
        base = rt.base_checkpoint
        rt.ensure_version(base)
        prompts = [rt.model_input(rt.prompts.render_solve(p.question)) for p in rt.step_problems(1)]
        model, tok = rt.policy.model, rt.policy.tokenizer
        model.eval()
        ours_tps, raw_tps = [], []
        for i in range(a.repeats + 1):  # interleaved; the first round warms up both
            params = SamplingParams(n=a.n, temperature=1.0, max_new_tokens=a.max_new_tokens, seed=i)
            t0 = time.perf_counter()
            groups = rt.engine.generate(prompts, params)
            t_ours = time.perf_counter() - t0
            ours_tokens = sum(len(c.token_ids) for g in groups for c in g)
            t0 = time.perf_counter()
            raw_tokens = raw_generate(model, tok, prompts, params)
            t_raw = time.perf_counter() - t0
            if i:
                ours_tps.append(ours_tokens / t_ours)
                raw_tps.append(raw_tokens / t_raw)
            print(f"round {i}: ours {ours_tokens} tok in {t_ours:.2f}s, raw {raw_tokens} tok in {t_raw:.2f}s", flush=True)
    ours, raw = statistics.median(ours_tps), statistics.median(raw_tps)
    ratio = ours / raw
    print(f"ours {ours:,.0f} tok/s, raw HF generate {raw:,.0f} tok/s")
    if not a.no_doc:
        cmd = ".venv/bin/python benchmarks/generation.py" + "".join(" " + x for x in (argv or sys.argv[1:]))
        write_section("generation.py", cmd, [
            f"{a.prompts} prompts × n={a.n} samples, ≤{a.max_new_tokens} new tokens, temperature 1.0, top_k=0, "
            f"tiny warm-started model, {a.threads} threads; median of {a.repeats} interleaved rounds.", "",
            f"- ours (`HFEngine.generate`): {ours:,.0f} generated tok/s",
            f"- raw `model.generate` on the same expanded batch: {raw:,.0f} generated tok/s",
            f"- **ratio: {ratio:.3f}** (goal ≥ 0.95)"])
    print(f"generation_ratio_vs_hf: {ratio:.3f}")
    return {"generation_ratio_vs_hf": ratio, "ours_tokens_per_s": ours, "raw_tokens_per_s": raw}


if __name__ == "__main__":
    main()
