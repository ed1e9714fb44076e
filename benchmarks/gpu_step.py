"""One MEL step and one GRPO step at a real model size on one GPU: where the time and the memory go.

Both steps run through the stage functions (``mel_core.step.stages``, no Prefect) on a randomly initialised Qwen3
of the real 1.7B or 4B shape (``transformers.Qwen3Config``, the shapes of the published config.json files:
vocab 151936, tied embeddings, head_dim 128, 8 KV heads), bf16, gradient checkpointing, generation by the HF
engine (``model.engine: hf``, ``transformers.generate`` on the training module itself). Printed per shape:
seconds per stage of each arm, generated tokens per second of sample / diagnose (the analyses) / replay, the
update's seconds and MFU, peak GPU memory, and MEL step seconds / GRPO step seconds.

    python benchmarks/gpu_step.py                       # GPU: --shape 1.7b 4b, B=16 G=8, 512 new tokens
    python benchmarks/gpu_step.py --shape micro --device cpu   # a 3.7M-parameter Qwen3 on CPU, ~15 s

The GPU defaults were sized by estimate to finish both shapes within 5 minutes on one H200 (HF generate at
~20-30 ms per decoding step, four generations of 512 steps per shape, plus model set-up and checkpoint
writes). Measured on an H200 (docs/BENCHMARKS.md): 1.7B at 256 new tokens takes ~2 minutes; 4B at 512 tokens took
over 5 minutes (the session's device time cut it before its table): ``--shape 1.7b`` alone, or fewer
``--max-new-tokens``, in a short lease. The first generation of the process (the GRPO arm's sample) included CUDA
warm-up: those numbers were taken with a 4-token warm-up, and the script now generates the first arm's batch at
full length once before timing (``_warm_up``; not yet re-measured on a GPU).

What is real and what is scripted. A random model writes random tokens: its rollouts would never verify,
its analyses never parse, and without an eos every generation runs to its token limit. So the *compute* is
real and the *control flow* is decided: the engine this script hands the runtime (``Runtime.use_engine``,
as tests/scripted.py does) first calls the runtime's real ``HFEngine.generate`` with the stage's prompts
and sampling parameters (timed, its generated tokens counted), then returns, for each sequence, a text of
about the same number of tokens (the tiny tokenizer's) that a script chooses, ending with eos
(finish_reason "stop"):

- sample: the synthetic task's step-by-step solution, right for even sample indices and off by one for odd
  ones (every group mixed: B pairs), padded with re-check lines to the length of the real generation;
- diagnose: an analysis in the tiny prompt set's compact layout (Bifurcation / Critique / Heuristic) that
  parses, its critique padded to the length of the real generation, so the NLL update trains targets of the
  analysis budget's length given retrospective contexts holding two full-length solutions;
- replay: a right solution of the replay budget's length, so every meta-experience is accepted.

Everything downstream of the engine is the pipeline's own code on those texts: verification (inline, the
synthetic task's last ``Answer:`` line; no math-verify workers), pairing, parsing, the retrospective contexts,
the library, the DuckDB store, and the update (``Policy.train_step``: L_RL over the B*G rollouts plus L_NLL
over the accepted M*, micro-batched, AdamW) and the checkpoint the update stage writes. Stage seconds
exclude the script's own text building (printed apart; milliseconds). Generation runs to the token limit
(a random model almost never samples eos), as a real model's longest rollouts do; HF ``generate`` is not a
serving engine (vLLM is), so the sampling numbers are the HF engine's.

The update's MFU counts model FLOPs 6 * N * tokens: N the non-embedding parameters over every trained token
(prompt + completion, no padding) plus the tied embedding as lm_head over the scored (completion) tokens
(``logits_to_keep``: no logits over prompts); attention's own FLOPs are left out. Against ``--peak-tflops``
(989: an H200's dense bf16). With gradient checkpointing the hardware also recomputes each layer's forward,
~8N instead of 6N: printed as HFU. Update seconds are ``Policy.train_step``'s; the update stage also saves
the checkpoint (weights + AdamW state): with ``run.async_save`` (the default) it copies them to host memory and a
thread writes the directory, which the next step's generation overlaps; both are printed (a lone step has nothing
to overlap the write: it is waited for after the step's seconds).

A bare GPU host (torch with CUDA and transformers installed; no vLLM, no Prefect, no network). Besides torch
and transformers (and what they bring: numpy, PyYAML, tqdm, tokenizers, safetensors) this script imports
duckdb, pyarrow and omegaconf (2.4 vendors its antlr4 runtime; attrs is optional) and nothing of prefect,
flows/ or tasks/. Checked here: a fresh virtual environment holding only torch (2.13, CPU) and transformers
(5.23.0, and 5.17.0 as on the H200 image) with their dependencies, plus these three wheels, runs the micro
shape. Fetch the wheels on a machine with network for the host's Python and platform (the H200 image here:
Python 3.12.3, torch 2.11, transformers 5.17.0, pyarrow already installed: duckdb and omegaconf alone, 25 MB):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl duckdb==2.0.0 omegaconf==2.4.0 pyarrow==26.0.1   # pyarrow (55 MB) only where it is missing

(``.whl/`` is in .gitignore: the wheels are never committed), then on the host, from the repository root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_step.py        # writes its section of docs/BENCHMARKS.md

(with this workplace's device tool: carry [".whl"], and copy docs/BENCHMARKS.md to $OUT to bring it back).

The model (~3.4 GB for 1.7B, ~8 GB for 4B in bf16) and the runs' checkpoints (4B: ~24 GB with the AdamW
state) go to ``--workdir`` (default: a temporary directory in /dev/shm when it has 48 GiB free, else in
$TMPDIR), one shape and one arm at a time, each removed when done.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._doc import write_section  # noqa: E402
from mel_core import config as C
from mel_core.model import tiny
from mel_core.model.engines.base import Completion, SamplingParams
from mel_core.model.engines.hf import HFEngine
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import arithmetic
from mel_core.run import executions
from mel_core.step import stages
from mel_core.step.runtime import Runtime
from mel_core.vocabulary import STAGES

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
GRPO_STAGES = ("sample", "verify", "update")
GENERATING = ("sample", "diagnose", "abstract", "replay")
MAX_POSITIONS = 40960  # Qwen3-1.7B / -4B config.json
ROPE_THETA = 1_000_000.0

# Qwen3's published shapes (config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-4B); micro runs on CPU.
SHAPES = {
    "micro": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=768, vocab_size=2048),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728, vocab_size=151936),
}
# Defaults per device: (prompts B, group G, new tokens of rollouts / analyses / replays, micro-batch)
GPU_DEFAULTS = dict(prompts=16, group_size=8, max_new_tokens=512, analysis_max_new_tokens=512,
                    replay_max_new_tokens=512, micro_batch_size=16)
CPU_DEFAULTS = dict(prompts=4, group_size=4, max_new_tokens=96, analysis_max_new_tokens=96,
                    replay_max_new_tokens=96, micro_batch_size=8)
H200_DENSE_BF16_TFLOPS = 989.0
RULE = "If a step uses an earlier result, then copy that result exactly."


# ------------------------------------------------------------------------------------------ the model


def build_model_dir(shape: str, path: Path, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """A randomly initialised Qwen3 of `shape` with the embedded tiny tokenizer (its ids are a subset of the
    vocabulary), saved like any checkpoint; returns its parameter counts."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    cfg = C.load(TINY_CONFIG)
    prompts = PromptSet.load(cfg.prompts.dir)
    tok = tiny.build_tokenizer(cfg.model.tiny, tiny.tokenizer_corpus(prompts, cfg.data.synthetic,
                                                                     tiny.TOKENIZER_CORPUS_SIZE, seed))
    tok.model_max_length = MAX_POSITIONS
    s = SHAPES[shape]
    if len(tok) > s["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} ids, more than the {shape} vocabulary")
    eos = tok.eos_token_id
    config = Qwen3Config(**s, max_position_embeddings=MAX_POSITIONS, max_window_layers=s["num_hidden_layers"],
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_cache=True, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it will run: seconds for 4B on a GPU, minutes on a CPU
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
    for key in ("eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, eos)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    total = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    embedding = model.get_input_embeddings().weight.numel()
    del model
    _free(device)
    return {"parameters": total, "embedding": embedding}


# ------------------------------------------------------------------------------- what the model "says"


class Script:
    """The text of each sequence by the kind of prompt (tiny prompt set), padded to a number of tokens."""

    def __init__(self, tokenizer, seed: int = 0):
        self.tok = tokenizer
        rng = random.Random(seed)
        ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

        def lines(fmt: str, n: int = 512) -> list[tuple[str, int]]:
            out = []
            for _ in range(n):
                a, b, op = rng.randint(1, 20), rng.randint(1, 20), rng.choice("+-*")
                line = fmt.format(a=a, b=b, op=op, r=ops[op](a, b))
                out.append((line, self.count("\n" + line)))
            return out

        self.check_lines = lines("check: {a} {op} {b} = {r}")
        self.critique_lines = lines("recheck: {a} {op} {b} = {r}, and the later steps must use {r} as written.")

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def _padded(self, head: list[str], filler: list[tuple[str, int]], tail: list[str], target: int, start: int) -> str:
        """head + filler lines + tail, as many filler lines as keep it within `target` tokens."""
        text = "\n".join(head + tail)
        budget = target - self.count(text)
        fill: list[str] = []
        i = start
        while budget > 0:
            line, cost = filler[i % len(filler)]
            if cost > budget:
                break
            fill.append(line)
            budget -= cost
            i += 1
        while fill:  # joining can merge tokens across lines: re-measure, drop lines until it fits
            text = "\n".join(head + fill + tail)
            if self.count(text) <= target:
                break
            fill.pop()
        return "\n".join(head + fill + tail)

    def solution(self, question: str, correct: bool, target: int, start: int) -> str:
        lines = arithmetic.solution_lines(question)
        if not correct:
            value = int(lines[-1].removeprefix(arithmetic.ANSWER_PREFIX))
            lines[-1] = f"{arithmetic.ANSWER_PREFIX}{value + 1}"
        return self._padded(lines[:-1], self.check_lines, lines[-1:], target, start)

    def analysis(self, question: str, target: int, start: int) -> str:
        right = arithmetic.solution_lines(question)
        k = len(right)  # the wrong solution differs in its answer line
        wrong_answer = int(right[-1].removeprefix(arithmetic.ANSWER_PREFIX)) + 1
        head = [f"Bifurcation: step {k}",
                f"Critique: the answer line says {wrong_answer} where the steps give "
                f"{right[-1].removeprefix(arithmetic.ANSWER_PREFIX)}."]
        return self._padded(head, self.critique_lines, [f"Heuristic: {RULE}"], target, start)

    def write(self, prompt: str, index: int, target: int) -> str:
        """`prompt` is the model input of one of the tiny prompt set's templates (no chat template)."""
        questions = re.findall(r"^Q: (.*)$", prompt, re.MULTILINE)
        if prompt.startswith("Hint:"):  # replay: the meta-experience, then the question
            return self.solution(questions[-1].strip(), True, target, index)
        question = questions[0].strip()
        if prompt.rstrip().endswith("Analysis:"):
            return self.analysis(question, target, index)
        if "\nWrong:\n" in prompt:  # two_pass's second call: the heuristics
            return f"Heuristic: {RULE}"
        return self.solution(question, index % 2 == 0, target, 7 * index)


@dataclass
class GenerateCall:
    stage: str
    sequences: int
    tokens: int          # generated by the real model (up to and including eos, else to the limit)
    generate_s: float
    script_s: float


@dataclass
class BenchEngine:
    """The runtime's HF engine generates for real; the script decides the text each sequence returns."""
    inner: HFEngine
    script: Script
    device: torch.device
    version: str | None = None
    calls: list[GenerateCall] = field(default_factory=list)
    reads_checkpoints = False  # generates with the policy's module: checkpoints may be written in the background

    def load_version(self, version: str, path: str) -> None:
        self.version = version  # the HF engine's module is the policy's: Runtime.ensure_version moved it already

    def generate(self, prompts, params: SamplingParams, desc: str = "") -> list[list[Completion]]:
        _sync(self.device)
        t0 = time.perf_counter()
        real = self.inner.generate(prompts, params, desc=desc)
        _sync(self.device)
        t1 = time.perf_counter()
        tok = self.script.tok
        out = []
        for prompt, group in zip(prompts, real):
            row = []
            for i, c in enumerate(group):
                text = self.script.write(prompt, i, max(1, min(len(c.token_ids), params.max_new_tokens) - 1))
                ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                if len(ids) > params.max_new_tokens:  # the length limit cuts it, as a real engine would
                    ids = ids[:params.max_new_tokens]
                    row.append(Completion(tok.decode(ids, skip_special_tokens=True), ids, "length"))
                else:
                    row.append(Completion(text, ids, "stop"))
            out.append(row)
        self.calls.append(GenerateCall(desc.split()[0] if desc else "generate", len(prompts) * params.n,
                                       sum(len(c.token_ids) for g in real for c in g), t1 - t0,
                                       time.perf_counter() - t1))
        return out


# ------------------------------------------------------------------------------------------ one arm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def arm_config(a, shape: str, arm: str, model_dir: Path, root: Path):
    ov = [f"run.name=gpu-step-{shape}-{arm}", f"run.root_dir={root}", f"run.torch_threads={a.threads}",
          f"model.name_or_path={model_dir}", f"model.dtype={a.dtype}", f"model.master_dtype={a.master_dtype}",
          f"model.device={a.device}",
          f"model.gradient_checkpointing={str(not a.no_gradient_checkpointing).lower()}",
          f"model.max_seq_len={a.max_seq_len}", f"prompts.dir={REPO / 'configs' / 'prompts' / 'tiny'}",
          f"sampling.prompts_per_step={a.prompts}", f"sampling.group_size={a.group_size}",
          f"sampling.max_new_tokens={a.max_new_tokens}", f"sampling.chunk_sequences={a.chunk_sequences}",
          f"experience.analysis_max_new_tokens={a.analysis_max_new_tokens}",
          f"experience.replay_max_new_tokens={a.replay_max_new_tokens}",
          f"optim.micro_batch_size={a.micro_batch_size}"]
    if arm == "grpo":
        ov += ["experience.enabled=false", "loss.nll_coef=0"]
    return C.load(TINY_CONFIG, ov)


def _warm_up(rt: Runtime, engine: HFEngine, full_length: bool) -> None:
    """Outside the timing: what a campaign does once before step 1 (the usable problems: their prompts
    tokenized) and a process's first kernels (allocator, cuBLAS, generate's setup). The first arm of a shape
    (`full_length`) also generates the step's batch at full length once: on an H200 the first full-length generation of a process
    took 2.2-2.9x as long as the same generation later (1.7B: 20.2 s vs 8.9 s; 4B: 58.2 s vs 26.6 s, with only a
    4-token warm-up), which charged the GRPO arm (it runs first) for the process's warm-up."""
    prompts = [rt.model_input(rt.prompts.render_solve(p.question)) for p in rt.step_problems(1)]
    engine.generate(prompts, SamplingParams(n=rt.cfg.sampling.group_size, seed=0,
                                            max_new_tokens=rt.cfg.sampling.max_new_tokens if full_length else 4))
    model = rt.policy.model
    ids = torch.randint(1, len(rt.policy.tokenizer), (2, 32), device=rt.policy.device)
    model.train()
    model(input_ids=ids, logits_to_keep=9).logits.float().mean().backward()
    model.zero_grad(set_to_none=True)
    _sync(rt.policy.device)


def run_arm(a, shape: str, arm: str, model_dir: Path, root: Path, log, first: bool) -> dict:
    """One step (step 1) of `arm` from the base model; seconds per stage and what the update trained. The shape's
    `first` arm warms up at full length (_warm_up)."""
    rt = Runtime(arm_config(a, shape, arm, model_dir, root))
    base = rt.base_checkpoint
    rt.ensure_version(base)
    inner = rt.engine
    if not isinstance(inner, HFEngine):
        raise RuntimeError(f"expected the HF engine, got {type(inner).__name__}")
    device = rt.policy.device
    engine = BenchEngine(inner, Script(rt.policy.tokenizer), device)
    rt.use_engine(engine)
    rt.ensure_version(base)
    executions.register_run(rt, base)
    _warm_up(rt, inner, full_length=first)

    policy = rt.policy
    trained: dict = {}
    train_step = policy.train_step

    def timed_train_step(rl, nll, data_parallel=None):
        _sync(device)
        t0 = time.perf_counter()
        out = train_step(rl, nll, data_parallel)
        _sync(device)
        trained["seconds"] = time.perf_counter() - t0
        batches = [(rl.prompts, rl.completion_ids)] + ([(nll.prompts, nll.target_ids)] if nll and nll.prompts else [])
        trained["tokens"] = sum(len(p) + len(c) for prompts, comps in batches
                                for p, c in zip(policy.encode_prompts(prompts), comps))
        trained["scored_tokens"] = sum(len(c) for _, comps in batches for c in comps)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
        trained["rl_lengths"] = (mean([len(p) for p in policy.encode_prompts(rl.prompts)]),
                                 mean([len(c) for c in rl.completion_ids]))
        trained["nll_lengths"] = ((mean([len(p) for p in policy.encode_prompts(nll.prompts)]),
                                   mean([len(c) for c in nll.target_ids])) if nll and nll.prompts else None)
        trained["rl_sequences"], trained["nll_sequences"] = len(rl.prompts), len(nll.prompts) if nll else 0
        return out

    policy.train_step = timed_train_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = 1
    calls = {"sample": lambda: stages.sample(rt, step, base), "verify": lambda: stages.verify(rt, step),
             "pair": lambda: stages.pair(rt, step), "diagnose": lambda: stages.diagnose(rt, step, base),
             "abstract": lambda: stages.abstract(rt, step, base), "replay": lambda: stages.replay(rt, step, base),
             "update": lambda: stages.update(rt, step, base)}
    seconds, manifests = {}, {}
    for name in (STAGES if arm == "mel" else GRPO_STAGES):
        _sync(device)
        t0 = time.perf_counter()
        manifests[name] = calls[name]()
        _sync(device)
        script_s = sum(c.script_s for c in engine.calls if c.stage == name)
        seconds[name] = time.perf_counter() - t0 - script_s
        log(f"  {shape} {arm}: {name} {seconds[name]:.2f}s")
    # run.async_save: the update stage copied the checkpoint to host memory and a thread writes it, which the next
    # step's generation would overlap. Here there is none: the write alone, waited for outside the step's seconds.
    t0 = time.perf_counter()
    rt.settle_saves()
    background_save_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    gen = {}
    for c in engine.calls:
        g = gen.setdefault(c.stage, {"sequences": 0, "tokens": 0, "generate_s": 0.0, "script_s": 0.0})
        g["sequences"] += c.sequences
        g["tokens"] += c.tokens
        g["generate_s"] += c.generate_s
        g["script_s"] += c.script_s
    del policy.train_step  # the class's method again
    out = {"arm": arm, "seconds": seconds, "step_s": sum(seconds.values()), "generation": gen, "update": trained,
           "save_s": seconds["update"] - trained["seconds"], "background_save_s": background_save_s, "peak_gib": peak,
           "manifests": manifests,
           "device": str(device)}
    shutil.rmtree(rt.run_dir, ignore_errors=True)  # its checkpoint: GBs at a real size
    return out  # the runtime, its policy and optimizer go with this frame (the caller frees the memory)


# -------------------------------------------------------------------------------------- one shape


def model_flops(tokens: int, scored: int, counts: dict, recompute: bool) -> tuple[float, float]:
    """(model FLOPs 6N, hardware FLOPs: 8N for the layers when checkpointing recomputes their forward)."""
    body = counts["parameters"] - counts["embedding"]
    head = 6 * counts["embedding"] * scored  # the tied embedding as lm_head, on the completion columns only
    return 6 * body * tokens + head, (8 if recompute else 6) * body * tokens + head


def run_shape(a, shape: str, work: Path, log) -> dict:
    device = torch.device(a.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    model_dir = work / f"model-{shape}"
    t0 = time.perf_counter()
    counts = build_model_dir(shape, model_dir, dtype, device, a.seed)
    log(f"{shape}: {counts['parameters'] / 1e6:,.1f}M parameters ({counts['embedding'] / 1e6:,.1f}M embedding, tied), "
        f"built and saved in {time.perf_counter() - t0:.1f}s")
    arms = {}
    for i, arm in enumerate(("grpo", "mel")):
        arms[arm] = run_arm(a, shape, arm, model_dir, work / "runs", log, first=i == 0)
        _free(device)  # one policy and optimizer on the device at a time
    shutil.rmtree(model_dir, ignore_errors=True)
    mel, grpo = arms["mel"], arms["grpo"]
    res = {"shape": shape, "counts": counts, "arms": arms, "ratio": mel["step_s"] / grpo["step_s"]}
    for arm, r in arms.items():
        u = r["update"]
        flops, hw = model_flops(u["tokens"], u["scored_tokens"], counts, not a.no_gradient_checkpointing)
        r["update_tflops"] = flops / u["seconds"] / 1e12
        r["mfu"] = r["update_tflops"] / a.peak_tflops if a.peak_tflops else None
        r["hfu"] = hw / u["seconds"] / 1e12 / a.peak_tflops if a.peak_tflops else None
    for stage in GENERATING:
        g = mel["generation"].get(stage)
        res[f"{stage}_tokens_per_s"] = g["tokens"] / g["generate_s"] if g else None
    res["wall_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------- reporting


def _f(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def headline(res: dict) -> dict[str, float | None]:
    p = "gpu_step_" + res["shape"].replace(".", "_") + "_"
    mel, grpo = res["arms"]["mel"], res["arms"]["grpo"]
    peaks = [r["peak_gib"] for r in (mel, grpo) if r["peak_gib"] is not None]
    return {p + "sample_tokens_per_s": res["sample_tokens_per_s"],
            p + "analysis_tokens_per_s": res["diagnose_tokens_per_s"],
            p + "replay_tokens_per_s": res["replay_tokens_per_s"],
            p + "update_s_grpo": grpo["update"]["seconds"], p + "update_s_mel": mel["update"]["seconds"],
            p + "update_mfu_mel": mel["mfu"], p + "update_mfu_grpo": grpo["mfu"],
            p + "peak_gpu_memory_gib": max(peaks) if peaks else None,
            p + "mel_grpo_step_ratio": res["ratio"]}


def table(res: dict, a) -> list[str]:
    mel, grpo = res["arms"]["mel"], res["arms"]["grpo"]
    c = res["counts"]
    lines = [f"### {res['shape']}: {c['parameters'] / 1e9:.3f}B parameters ({c['embedding'] / 1e9:.3f}B tied embedding), "
             f"{a.dtype} compute over {a.master_dtype} master weights, "
             f"gradient checkpointing {'off' if a.no_gradient_checkpointing else 'on'}, {mel['device']}", "",
             f"B={a.prompts} prompts x G={a.group_size}; new tokens: rollouts {a.max_new_tokens}, analyses "
             f"{a.analysis_max_new_tokens}, replays {a.replay_max_new_tokens}; model.max_seq_len {a.max_seq_len}; "
             f"optim.micro_batch_size {a.micro_batch_size}. MEL step: {mel['manifests']['pair']['pairs']} pairs, "
             f"{mel['manifests']['diagnose']['diagnosed']} analyses parsed, {mel['manifests']['replay']['accepted']} "
             f"accepted (reward mean {mel['manifests']['verify']['reward_mean']:.2f}).", "",
             "| stage | GRPO s | MEL s | MEL sequences x generated tokens | MEL generated tok/s |", "|---|---|---|---|---|"]
    for s in STAGES:
        g = mel["generation"].get(s)
        gen = f"{g['sequences']} x {g['tokens'] / g['sequences']:.0f} = {g['tokens']:,}" if g else ""
        tps = f"{g['tokens'] / g['generate_s']:,.0f}" if g else ""
        lines.append(f"| {s} | {_f(grpo['seconds'].get(s)) if s in grpo['seconds'] else ''} | "
                     f"{_f(mel['seconds'].get(s))} | {gen} | {tps} |")
    lines.append(f"| **step** | **{grpo['step_s']:.2f}** | **{mel['step_s']:.2f}** | | |")
    lines += ["", "| update | GRPO | MEL |", "|---|---|---|"]
    rows = [("sequences (RL + NLL)", lambda r: f"{r['update']['rl_sequences']} + {r['update']['nll_sequences']}"),
            ("tokens trained (prompt + completion)", lambda r: f"{r['update']['tokens']:,}"),
            ("mean RL prompt / rollout tokens", lambda r: "{:.0f} / {:.0f}".format(*r["update"]["rl_lengths"])),
            ("mean NLL context / M* tokens", lambda r: "{:.0f} / {:.0f}".format(*r["update"]["nll_lengths"])
             if r["update"]["nll_lengths"] else ""),
            ("train_step s", lambda r: f"{r['update']['seconds']:.2f}"),
            ("tokens/s", lambda r: f"{r['update']['tokens'] / r['update']['seconds']:,.0f}"),
            ("model TFLOP/s (6N)", lambda r: f"{r['update_tflops']:.3g}"),
            (f"MFU (6N, peak {_f(a.peak_tflops, '{:.0f}')} TFLOP/s)", lambda r: _f(r["mfu"], "{:.1%}")),
            ("HFU (8N with recompute)", lambda r: _f(r["hfu"], "{:.1%}")),
            ("checkpoint s in the update stage (the save, or with run.async_save the copy to host memory)",
             lambda r: f"{r['save_s']:.2f}"),
            ("checkpoint write s in the background (run.async_save; outside the step)",
             lambda r: f"{r['background_save_s']:.2f}"),
            ("peak GPU memory GiB", lambda r: _f(r["peak_gib"]))]
    lines += [f"| {name} | {fn(grpo)} | {fn(mel)} |" for name, fn in rows]
    script_s = sum(g["script_s"] for g in mel["generation"].values())
    lines += ["", f"- **MEL step ÷ GRPO step: {res['ratio']:.2f}**; sampling {_f(res['sample_tokens_per_s'], '{:,.0f}')} "
              f"tok/s, analyses {_f(res['diagnose_tokens_per_s'], '{:,.0f}')} tok/s, replays "
              f"{_f(res['replay_tokens_per_s'], '{:,.0f}')} tok/s; the script's text building "
              f"{script_s * 1000:.0f} ms (not in the stage seconds); shape done in {res['wall_s']:.0f}s", ""]
    return lines


def _workdir(a) -> tempfile.TemporaryDirectory:
    if a.workdir:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="mel-gpu-step-", dir=a.workdir)
    shm = Path("/dev/shm")
    if a.device.startswith("cuda") and shm.is_dir() and shutil.disk_usage(shm).free > 48 * 2**30:
        return tempfile.TemporaryDirectory(prefix="mel-gpu-step-", dir=shm)
    return tempfile.TemporaryDirectory(prefix="mel-gpu-step-")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES),
                    help="model shapes, one after the other (default: 1.7b 4b on a GPU, micro on CPU)")
    ap.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU) | cuda | cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype (model.dtype)")
    ap.add_argument("--master-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and AdamW state (model.master_dtype); the numbers of docs/BENCHMARKS.md before "
                         "master weights were bfloat16")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    d = "(default: {gpu} on a GPU, {cpu} on CPU)"
    for name, help_ in (("prompts", "prompts per step B"), ("group_size", "rollouts per prompt G"),
                        ("max_new_tokens", "rollout tokens"), ("analysis_max_new_tokens", "analysis tokens"),
                        ("replay_max_new_tokens", "replay tokens"), ("micro_batch_size", "sequences per forward/backward")):
        ap.add_argument("--" + name.replace("_", "-"), type=int,
                        help=f"{help_} {d.format(gpu=GPU_DEFAULTS[name], cpu=CPU_DEFAULTS[name])}")
    ap.add_argument("--max-seq-len", type=int, default=0,
                    help="model.max_seq_len; 0 = 2 rollouts + an analysis + 128 (the retrospective context fits whole)")
    ap.add_argument("--chunk-sequences", type=int, default=256, help="sampling.chunk_sequences (sequences per generate)")
    ap.add_argument("--peak-tflops", type=float, help=f"the device's dense peak for MFU (default: "
                    f"{H200_DENSE_BF16_TFLOPS:.0f}, an H200's dense bf16 by its datasheet, on a GPU; none on CPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (run.torch_threads; default: 1 on CPU, where "
                    "2 threads on 2 cores shared with other jobs ran 10-40x slower, spinning; torch's own on a GPU host)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the model and the runs go (default: /dev/shm if it has room, else $TMPDIR)")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/BENCHMARKS.md")
    a = ap.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = a.device.startswith("cuda")
    a.shape = a.shape or (["1.7b", "4b"] if gpu else ["micro"])
    for name, value in (GPU_DEFAULTS if gpu else CPU_DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.max_seq_len = a.max_seq_len or 2 * a.max_new_tokens + a.analysis_max_new_tokens + 128
    if a.threads is None:
        a.threads = 0 if gpu else 1
    if a.peak_tflops is None and gpu:
        a.peak_tflops = H200_DENSE_BF16_TFLOPS
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = lambda m: print(m, flush=True)
    gpu = a.device.startswith("cuda")
    device_name = torch.cuda.get_device_name(torch.device(a.device)) if gpu else f"CPU, {a.threads} threads"
    log(f"gpu_step: {device_name}; shapes {' '.join(a.shape)}; torch {torch.__version__}")
    t0 = time.perf_counter()
    results, lines = [], []
    with _workdir(a) as d:
        for shape in a.shape:  # each shape's table as soon as it is done
            results.append(run_shape(a, shape, Path(d), log))
            lines += table(results[-1], a)
            log("\n".join(table(results[-1], a)))
    wall = time.perf_counter() - t0
    heads = {k: v for r in results for k, v in headline(r).items()}
    if not a.no_doc:
        import transformers
        cmd = "python benchmarks/gpu_step.py" + "".join(" " + x for x in (argv if argv is not None else sys.argv[1:]))
        where = (f"Ran on {device_name}." if gpu else
                 "**Ran on CPU at the micro shape: the GPU numbers (1.7B and 4B on an H200) are still missing** — "
                 "this section shows the benchmark working end to end; its seconds say nothing about a GPU, and "
                 "on shared cores they are noisy (the two arms' sample stages do the same work). "
                 "Run `python benchmarks/gpu_step.py` on a GPU host (see the module docstring for the wheels it "
                 "needs there).")
        write_section("gpu_step.py", cmd, [
            where, "",
            "One GRPO step (sample, verify, update) and one MEL step (all seven stages), each from the same randomly "
            "initialised Qwen3 of the named shape, through `mel_core.step.stages` (no Prefect), HF engine. Generation and "
            "update are real compute at real shapes; the text each sequence returns is scripted (a solution, right for "
            "half of each group; an analysis that parses; a replay that verifies) at the length the model generated, "
            "so every stage runs with realistic lengths (module docstring). MFU: model FLOPs 6N per trained token "
            "(lm_head on the scored tokens only), attention FLOPs left out.", "",
            *lines, f"- Whole run: {wall:.0f}s", ""],
            f"torch {torch.__version__}", f"transformers {transformers.__version__}")
    for k, v in heads.items():
        print(f"{k}: {_f(v, '{:.4g}')}")
    return {"results": results, "headline": heads, "wall_s": wall, "device": device_name}


if __name__ == "__main__":
    main()
