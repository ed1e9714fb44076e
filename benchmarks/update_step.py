"""Update-step throughput: our Policy.train_step vs TRL 1.16's GRPOTrainer._compute_loss + backward + step.

Same model (the tiny Qwen2 shape), same batch (B sequences of prompt + completion tokens), same AdamW,
fp32 on CPU. Tokens/s counts completion tokens trained per second (forward + backward + optimizer step).

    .venv/bin/python benchmarks/update_step.py [--batch 128 --completion 48 --repeats 5]
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
from mel_core.model.policy import Policy, RLBatch
from mel_core.problems.prompts import PromptSet


def build(workdir: Path, micro: int = 0):
    cfg = C.load("configs/tiny.yaml", ["optim.lr=1e-5", "loss.nll_coef=0", f"optim.micro_batch_size={micro}"])
    prompts = PromptSet.load(cfg.prompts.dir)
    tok = tiny.build_tokenizer(cfg.model.tiny, tiny.tokenizer_corpus(prompts, cfg.data.synthetic, 500, 0))
    torch.manual_seed(0)
    tiny.build_model(cfg.model.tiny, tok).save_pretrained(workdir)
    tok.save_pretrained(workdir)
    return cfg, tok


def make_batch(tok, B: int, P: int, T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(tok) - 1
    prompt_lens = torch.randint(P // 2, P + 1, (B,), generator=g).tolist()
    comp_lens = torch.randint(T // 2, T + 1, (B,), generator=g).tolist()
    # Prompts travel as text in the pipeline: both sides get the ids that text encodes to.
    texts = [tok.decode(torch.randint(1, vocab, (p,), generator=g).tolist()) for p in prompt_lens]
    prompts = tok(texts, add_special_tokens=False)["input_ids"]
    comps = [torch.randint(1, vocab, (c,), generator=g).tolist() for c in comp_lens]
    adv = torch.randn(B, generator=g)
    return prompts, comps, adv


def bench_ours(cfg, path, tok, prompts, comps, adv, repeats):
    policy = Policy(cfg, path)
    texts = [tok.decode(p) for p in prompts]
    # prompts go in as text (as in the pipeline); re-encode to keep token counts honest
    batch = RLBatch(prompts=texts, completion_ids=comps, advantages=adv)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        policy.train_step(batch, None)
        if i:  # the first call warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_trl(cfg, path, tok, prompts, comps, adv, repeats, workdir):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(path)
    T = max(len(c) for c in comps)
    args = GRPOConfig(output_dir=str(workdir / "trl"), use_cpu=True, use_vllm=False, report_to="none", bf16=False,
                      per_device_train_batch_size=8, num_generations=8, max_completion_length=T,
                      temperature=cfg.sampling.temperature, save_strategy="no", loss_type="grpo", beta=0.0,
                      gradient_checkpointing=False, learning_rate=cfg.optim.lr)
    tr = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                     train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}), processing_class=tok)
    tr.current_gradient_accumulation_steps = 1
    P = max(len(p) for p in prompts)
    B = len(prompts)
    prompt_ids = torch.full((B, P), tok.pad_token_id)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_ids = torch.full((B, T), tok.pad_token_id)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = 1
        completion_ids[i, :len(c)] = torch.tensor(c)
        completion_mask[i, :len(c)] = 1
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=adv, old_per_token_logps=None,
                  num_items_in_batch=completion_mask.sum())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    model.train()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss = tr._compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--completion", type=int, default=48)
    ap.add_argument("--micro", type=int, default=32,
                    help="our optim.micro_batch_size for the headline (length-grouped micro-batches)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cfg, tok = build(work / "model")
        micro_cfg, _ = build(work / "model", micro=a.micro)
        prompts, comps, adv = make_batch(tok, a.batch, a.prompt, a.completion)
        tokens = sum(len(c) for c in comps)
        whole = bench_ours(cfg, work / "model", tok, prompts, comps, adv, a.repeats)
        ours = bench_ours(micro_cfg, work / "model", tok, prompts, comps, adv, a.repeats)
        trl_s = bench_trl(cfg, work / "model", tok, prompts, comps, adv, a.repeats, work)
    res = {"update_tokens_per_s_ours": tokens / ours, "update_tokens_per_s_ours_whole_batch": tokens / whole,
           "update_tokens_per_s_trl": tokens / trl_s, "update_step_ratio_vs_trl_whole_batch": trl_s / whole,
           "update_step_ratio_vs_trl": trl_s / ours}
    print(f"batch {a.batch} sequences, {tokens} completion tokens; median of {a.repeats} steps")
    print(f"ours: {ours:.3f} s/step (micro-batches of {a.micro}), {whole:.3f} s/step (one batch); "
          f"TRL _compute_loss+backward+step: {trl_s:.3f} s/step")
    for k, v in res.items():
        if k != "update_step_ratio_vs_trl":  # the headline is the last line
            print(f"{k}: {v:.3f}")
    if not a.no_doc:
        cmd = ".venv/bin/python benchmarks/update_step.py" + "".join(" " + x for x in (argv or sys.argv[1:]))
        write_section("update_step.py", cmd, [
            f"Batch: {a.batch} sequences, prompts ≤{a.prompt} tokens, completions ≤{a.completion} tokens "
            f"({tokens} completion tokens); tiny Qwen2 shape, fp32, {a.threads} threads; same model, batch, AdamW "
            f"and clipping; median of {a.repeats} steps.", "",
            f"- ours, `optim.micro_batch_size={a.micro}` (gradient accumulation over length-grouped micro-batches, "
            f"each cut to its longest row; the loss is the same to 1e-6, tests/test_policy.py): {ours:.3f} s, "
            f"{res['update_tokens_per_s_ours']:.0f} tok/s",
            f"- ours, one batch (`micro_batch_size=0`): {whole:.3f} s, {res['update_tokens_per_s_ours_whole_batch']:.0f} tok/s "
            f"(ratio {res['update_step_ratio_vs_trl_whole_batch']:.2f}: the same forward/backward as TRL's)",
            f"- TRL 1.16 `_compute_loss` + backward + clip + AdamW step, one batch: {trl_s:.3f} s, "
            f"{res['update_tokens_per_s_trl']:.0f} tok/s",
            f"- **ratio ours/TRL (tokens/s): {res['update_step_ratio_vs_trl']:.2f}** (goal ≥ 1.0)",
        ])
    print(f"update_step_ratio_vs_trl: {res['update_step_ratio_vs_trl']:.3f}")
    return res


if __name__ == "__main__":
    main()
