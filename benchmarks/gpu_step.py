"""TRL's GRPO step against mel's GRPO and MEL steps (in sequence and with orchestration.overlap) on one GPU: same
model shape, batch and engine, each arm in its own process, per-phase seconds over repeated steps.

    python benchmarks/gpu_step.py                      # GPU: 1.7B shape, B=16 x G=8, 256 new tokens, bf16, vLLM
    python benchmarks/gpu_step.py decode               # the decode micro-benchmark alone: HF vs vLLM
    python benchmarks/gpu_step.py --shape micro --device cpu   # the CPU dry run (CI-sized; < 2 minutes on 2 cores)

**Status: this version has been dry-run on CPU only** (the micro shape, HF generation, TRL without vLLM). It
has not run on a GPU: no number it prints at 1.7B exists yet. docs/BENCHMARKS.md keeps the H200 numbers of the
previous version of this script (one MEL step and one GRPO step, HF engine, one process, no TRL arm).

What one command does (``bench``, the default), printing as it goes so a run cut short still reports:

1. builds a randomly initialised Qwen3 of the chosen shape (``transformers.Qwen3Config`` with the published
   config.json's sizes: 1.7B or 4B; ``micro`` on CPU) with the embedded tiny tokenizer, saved once in
   ``--workdir`` (on a GPU in a process of its own);
2. runs each arm in its own Python process (``--child``), one after the other, so no arm inherits another's
   allocator, compiled kernels or engine:

   - ``trl``: TRL's ``GRPOTrainer`` with ``use_vllm=True, vllm_mode="colocate"``, ``save_strategy="no"``,
     ``num_generations=G``, ``max_completion_length`` = the rollout budget, ``per_device_train_batch_size`` =
     ``--micro-batch-size`` with gradient accumulation so that one optimizer step covers one generation batch
     of B x G (``generation_batch_size`` = B*G), gradient checkpointing as mel's, weights loaded in
     ``--master-dtype`` (float32) under bf16 autocast (``bf16=True``: TRL's own default, and mel's model.master_dtype) and
     ``generation_kwargs={"detokenize": False}`` (TRL decodes with the tokenizer itself). The random model
     writes random tokens; a scripted reward function makes the requested fraction of groups mixed: in a
     mixed group the even sample indices score 1 and the odd ones 0, the other groups all score 1, so
     advantages are non-zero exactly where mel's arms have mixed groups. On CPU (no vLLM) it generates with
     transformers (``use_vllm=False``);
   - ``grpo``: mel's GRPO step (sample, verify, update) through ``mel_core.step.stages``;
   - ``mel``: mel's MEL step (all seven stages) the same way, once per mixed fraction (``--mixed``);
   - ``mel-overlap``: ``mel`` with ``orchestration.overlap=1`` (docs/DESIGN.md "Overlap"), once per mixed fraction:
     step k runs sample(k) with the analyses of step k-1's pairs in the same engine call
     (``generate_together``), verify(k), pair(k), abstract(k-1), replay(k-1), update(k) — flows/iteration.py's
     order (no abstract or replay at the first step, a warm-up one). Both MEL arms sample their analyses at the
     rollouts' temperature (``experience.analysis_temperature``; the tiny config's 0.7 would not): the HF engine
     shares chunks only between requests that sample alike and runs the others one after the other;

   each runs ``--warmup`` untimed steps (2 on a GPU) and ``--steps`` timed steps (3), and writes its results
   as JSON after every step, which the parent reads: a crashed or cut arm is reported as such with the steps
   it finished, and the others still report;
3. prints per arm the median and min-max of each phase over the timed steps, generated and trained tokens per
   second, the update's MFU, peak GPU memory, its last step's engine calls; then the ratios mel-GRPO / TRL-GRPO,
   MEL / mel-GRPO and MEL overlap / mel-GRPO, with and without the checkpoint save, against the goals (mel-GRPO /
   TRL-GRPO <= 1.0; MEL / mel-GRPO <= 1.35 at 50% mixed, in sequence and with overlap; update MFU >= 35% at 1.7B).

Phases (seconds of one step; ``torch.cuda.synchronize`` before and after each, none on CPU):

- rollouts / analyses / replays: the engine's generate calls of the sample / diagnose (+ abstract) / replay
  stages; for TRL its ``vLLM.generate`` (or ``model.generate``) less the weight sync inside it;
- rollouts+analyses (MEL overlap): sample's one shared call, rollouts and the previous step's analyses together
  (the previous step had pairs; else its sample is "rollouts"). Its tokens are also counted per request, as
  rollouts and analyses tokens "within rollouts+analyses" (no seconds of their own);
- weight sync: handing the trained weights to the engine. mel: ``VLLMEngine.update_weights`` (what
  ``Runtime.trained_to`` does after an update; nothing for the HF engine, which generates with the trained
  module itself). TRL: ``vllm_generation.sync_weights``;
- score (TRL only): the rest of ``_generate_and_score_completions``: tokenizing, the rewards, and the extra
  forward pass for the old log-probs that TRL takes whenever it generates with vLLM (its importance-sampling
  correction);
- train: mel ``Policy.train_step`` (forward, backward, AdamW over the B*G rollouts and the accepted M*);
  TRL the rest of its optimizer step (forward/backward of every micro-batch, clipping, AdamW, the Trainer's
  own bookkeeping);
- save: mel's update stage writes a checkpoint (weights + AdamW state) every step: ``Policy.save_checkpoint``,
  synchronously here (the scripted engine is given with ``use_engine`` and keeps ``reads_checkpoints``, so
  ``run.async_save`` does not apply): the write that async saves move off the critical path.
  TRL runs with ``save_strategy="no"``: 0. Hence the two ratios, with the save and without it;
- other: what remains of the step: mel's verify, pair, abstract, the store's writes, the retrospective
  contexts, the update's batch building.

What is real and what is scripted in mel's arms. A random model writes random tokens: its rollouts would
never verify, its analyses never parse, and without an eos every generation runs to its token limit. So the
*compute* is real and the *control flow* is decided: the engine handed to the runtime (``Runtime.use_engine``,
as tests/scripted.py does) first calls the real engine (vLLM or HF: ``--engine``) with the stage's prompts and
sampling parameters (timed, its generated tokens counted), then returns, for each sequence, a text of about
the same number of tokens that a script chooses, ending with eos:

- sample: the synthetic task's step-by-step solution; in a mixed group right for even sample indices and off
  by one for odd ones, in the other groups right; padded with re-check lines to the length of the real
  generation. Mixed groups are spread evenly over the B positions (``is_mixed``), ``--mixed`` percent of them;
- diagnose: an analysis in the tiny prompt set's compact layout that parses, padded to the real length, so the
  NLL update trains targets of the analysis budget's length given retrospective contexts of two solutions;
- replay: a right solution of the replay budget's length, so every meta-experience is accepted.

Everything downstream of the engine is the pipeline's own code on those texts. Stage seconds exclude the
script's own text building (printed apart; milliseconds). TRL's arm needs no script: its reward is decided by
sample index, and its completions are the model's random tokens (the same lengths: both run to the limit).
mel's GRPO and TRL train every one of the B*G sequences whatever its advantage, so their compute does not
depend on the mixed fraction: they run once (at the first ``--mixed``); MEL and MEL overlap run at each fraction,
side by side.

MFU counts model FLOPs 6 * N * tokens: N the non-embedding parameters over every trained token (prompt +
completion, no padding) plus the tied embedding as lm_head over the scored (completion) tokens; attention's
own FLOPs are left out. Against ``--peak-tflops`` (989: the dense bf16 peak of an H100 SXM and of an H200 by
their datasheets). With gradient checkpointing the hardware also recomputes each layer's forward, ~8N instead
of 6N: printed as HFU.

Time. The GPU defaults (1.7B, B=16, G=8, 256 tokens, 2 + 3 steps, 50% first and then 25% and 100% for MEL and
MEL overlap while ``--budget-s`` = 540 lasts) were sized by estimate only, to end within 9 minutes on one H100/H200,
before the overlap arm was added: with it the later fractions are the likelier to be skipped. Each
process starts its engine (vLLM: tens of seconds for loading and CUDA graph capture), and mel writes a ~10 GB
checkpoint (1.7B, fp32 master weights + AdamW state) every step. An arm started with too little budget left is
skipped and reported; one still running at the deadline is cut, and reports the steps it finished.

``decode`` (also as ``--arms ... decode``): HF ``generate`` against vLLM ``LLM.generate`` on the same model, at
batch 16 and 128 and context 300 and 800 (``--decode-batches``, ``--decode-contexts``), ``--decode-tokens``
sampled tokens past a prefill (eos ignored); milliseconds per decoding step = (time of prefill + T tokens - time
of prefill + 1 token) / T, each engine in its own process; about 20 s of measurement on a GPU besides loading.

GPU host. mel's arms need torch, transformers, duckdb, pyarrow, omegaconf (and vLLM for ``--engine vllm``);
TRL's arm needs trl, datasets and accelerate besides; a mel arm imports nothing of prefect, flows/, tasks/,
ray, math-verify or trl (its JSON lists what it imported). This workplace's GPU image has torch 2.11 and
transformers 5.17 but neither vLLM nor trl nor datasets, and vLLM's wheels are far above the 64 MiB a device
call carries: there, only ``--engine hf`` runs (TRL then generates with transformers too), with the wheels of
duckdb, omegaconf, trl and datasets (and datasets' own: dill, multiprocess, xxhash) carried in ``.whl/``:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl duckdb==2.0.0 omegaconf==2.4.0 \
        trl==1.16.0 datasets dill multiprocess xxhash
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_step.py --engine hf   # writes its section of docs/BENCHMARKS.md

(untried: whether trl 1.16 runs with transformers 5.17 is not known here). The model (~3.4 GB for 1.7B in
bf16) and the runs' checkpoints go to ``--workdir`` (default: /dev/shm when it has 48 GiB free, else $TMPDIR);
each arm keeps one checkpoint at a time and removes its run when done.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

T_PROCESS = time.perf_counter()  # an arm's setup counts from here (its imports of torch before it left out)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._doc import DOC, write_section  # noqa: E402
from mel_core import config as C
from mel_core.model import tiny
from mel_core.model.engines.base import Completion, SamplingParams, generate_together
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import arithmetic
from mel_core.vocabulary import STAGES

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
GRPO_STAGES = ("sample", "verify", "update")
STEP_ARMS = ("trl", "grpo", "mel", "mel-overlap")  # the arms that time training steps (not build, not decode)
MEL_ARMS = ("mel", "mel-overlap")  # the arms run at every --mixed fraction
MAX_POSITIONS = 40960  # Qwen3-1.7B / -4B config.json
ROPE_THETA = 1_000_000.0
PHASES = ("rollouts", "rollouts+analyses", "analyses", "replays", "weight_sync", "score", "train", "save", "other")
GENERATED = ("rollouts", "rollouts+analyses", "analyses", "replays")  # the phases that generate: tokens counted
PHASE_OF_STAGE = {"sample": "rollouts", "diagnose": "analyses", "abstract": "analyses", "replay": "replays",
                  "transfer": "replays"}
# Optional dependencies a mel arm must not need on a bare GPU host (vLLM only with --engine vllm).
OPTIONAL = ("prefect", "flows", "tasks", "ray", "math_verify", "pebble", "trl", "peft", "vllm")
ARM_NAMES = {"trl": "TRL GRPOTrainer", "grpo": "mel GRPO", "mel": "mel MEL", "mel-overlap": "mel MEL overlap",
             "decode-hf": "decode: HF generate", "decode-vllm": "decode: vLLM"}

# Qwen3's published shapes (config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-4B); micro runs on CPU.
SHAPES = {
    "micro": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=768, vocab_size=2048),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=9728, vocab_size=151936),
}
GPU_DEFAULTS = dict(shape="1.7b", prompts=16, group_size=8, max_new_tokens=256, analysis_max_new_tokens=256,
                    replay_max_new_tokens=256, micro_batch_size=16, warmup=2, steps=3, budget_s=540.0,
                    mixed=[50.0, 25.0, 100.0], decode_batches=[16, 128], decode_contexts=[300, 800], decode_tokens=32)
CPU_DEFAULTS = dict(shape="micro", prompts=2, group_size=2, max_new_tokens=64, analysis_max_new_tokens=64,
                    replay_max_new_tokens=64, micro_batch_size=4, warmup=1, steps=1, budget_s=600.0,
                    mixed=[50.0], decode_batches=[2, 4], decode_contexts=[32, 64], decode_tokens=4)
DENSE_BF16_TFLOPS = 989.0  # H100 SXM and H200, dense bf16, by their datasheets
RULE = "If a step uses an earlier result, then copy that result exactly."
GOALS = {"mel_grpo_over_trl": 1.0, "mel_over_grpo_at_50": 1.35, "mfu_at_1_7b": 0.35}


def is_mixed(position: int, fraction: float) -> bool:
    """Whether group `position` of a step is mixed: floor((p+1)f) > floor(pf), so round(B*f) of B groups are,
    spread evenly (f = 0.5: the odd positions; f = 1: all)."""
    return math.floor((position + 1) * fraction + 1e-9) > math.floor(position * fraction + 1e-9)


# ------------------------------------------------------------------------------------------ the model


def build_model_dir(shape: str, path: Path, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """A randomly initialised Qwen3 of `shape` with the embedded tiny tokenizer (its ids are a subset of the
    vocabulary), saved like any checkpoint; returns its parameter counts and the KV bytes per token."""
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
    kv = s["num_hidden_layers"] * s["num_key_value_heads"] * s["head_dim"] * 2 * torch.finfo(dtype).bits // 8
    del model
    return {"parameters": total, "embedding": embedding, "kv_bytes_per_token": kv, "tokenizer_ids": len(tok)}


def model_flops(tokens: int, scored: int, counts: dict, recompute: bool) -> tuple[float, float]:
    """(model FLOPs 6N, hardware FLOPs: 8N for the layers when checkpointing recomputes their forward)."""
    body = counts["parameters"] - counts["embedding"]
    head = 6 * counts["embedding"] * scored  # the tied embedding as lm_head, on the completion columns only
    return 6 * body * tokens + head, (8 if recompute else 6) * body * tokens + head


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

    def write(self, prompt: str, index: int, target: int, mixed: bool = True) -> str:
        """`prompt` is the model input of one of the tiny prompt set's templates (no chat template); `index` the
        sample index in its group; `mixed`: whether a solve prompt's group is mixed (else every sample is right)."""
        questions = re.findall(r"^Q: (.*)$", prompt, re.MULTILINE)
        if prompt.startswith("Hint:"):  # replay: the meta-experience, then the question
            return self.solution(questions[-1].strip(), True, target, index)
        question = questions[0].strip()
        if prompt.rstrip().endswith("Analysis:"):
            return self.analysis(question, target, index)
        if "\nWrong:\n" in prompt:  # two_pass's second call: the heuristics
            return f"Heuristic: {RULE}"
        return self.solution(question, index % 2 == 0 or not mixed, target, 7 * index)


# ------------------------------------------------------------------------------- timing in an arm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds per phase, with a synchronize before and after each on a GPU; the device memory in use, sampled
    after each phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.peak_used_gib = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def phase(self, name: str):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - t0
            self.sample_memory()

    def sample_memory(self) -> None:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak_used_gib = max(self.peak_used_gib, (total - free) / 2**30)

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out

    def memory(self) -> dict:
        if self.device.type != "cuda":
            return {"peak_allocated_gib": None, "peak_device_used_gib": None}
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(self.device) / 2**30,
                "peak_device_used_gib": self.peak_used_gib}


class Result:
    """An arm's JSON, rewritten after every step (atomically), so the parent reads what a cut arm finished."""

    def __init__(self, path: str, **head):
        self.path = Path(path)
        self.data = {**head, "status": "running", "steps": []}
        self.save()

    def save(self) -> None:
        self.data["optional_modules_imported"] = sorted(m for m in OPTIONAL if sys.modules.get(m) is not None)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)

    def step(self, log, k: int, warmup: bool, step_s: float, phases: dict, tokens: dict, **extra) -> None:
        self.data["steps"].append({"step": k, "warmup": warmup, "step_s": step_s, "phases": phases,
                                   "tokens": tokens, **extra})
        self.save()
        shown = " ".join(f"{p} {phases[p]:.2f}" for p in PHASES if p in phases)
        log(f"step {k} ({'warm-up' if warmup else 'timed'}): {step_s:.2f}s | {shown}")


# ------------------------------------------------------------------------------- mel's arms


@dataclass
class BenchEngine:
    """The real engine (vLLM or HF) generates; the script decides the text each sequence returns. Told a new
    version after an update, it does what the runtime does for its own engine: vLLM is handed the trained
    module's weights in memory (timed as the weight sync), HF generates with that module already."""
    inner: object
    clock: Clock
    mixed: float
    version: str
    script: Script | None = None
    policy: object = None
    tokens: collections.Counter = field(default_factory=collections.Counter)
    script_s: float = 0.0
    calls: list[str] = field(default_factory=list)  # the step's engine calls, by their desc

    def load_version(self, version: str, path: str) -> None:
        if version == self.version:
            return
        if hasattr(self.inner, "update_weights"):
            with self.clock.phase("weight_sync"):
                self.inner.update_weights(version, self.policy.named_weights())
        else:
            self.inner.version = version
        self.version = version

    def generate(self, prompts, params: SamplingParams, desc: str = "") -> list[list[Completion]]:
        self.calls.append(desc)
        stage = desc.split()[0] if desc else "generate"
        phase = PHASE_OF_STAGE.get(stage, "other")
        with self.clock.phase(phase):
            real = self.inner.generate(prompts, params, desc=desc)
        self.tokens[phase] += generated_tokens(real)
        return self.scripted(stage, prompts, params, real)

    def generate_many(self, requests, desc: str = "") -> list[list[list[Completion]]]:
        """orchestration.overlap's shared call (``generate_together``; desc "sample step k + diagnose step k-1"):
        the real engine generates every request in one call, timed as one phase named after the requests' phases
        ("rollouts+analyses"); each request's tokens are also counted under its own phase, untimed apart."""
        self.calls.append(desc)
        kinds = [part.split()[0] for part in desc.split(" + ")] if desc else []
        if len(kinds) != len(requests):  # stages.sample's call names its requests in order; nothing else calls this
            raise ValueError(f"generate_many: {len(requests)} requests, desc {desc!r} names {len(kinds)}")
        phases = [PHASE_OF_STAGE.get(k, "other") for k in kinds]
        shared = "+".join(dict.fromkeys(phases))
        with self.clock.phase(shared):
            real = generate_together(self.inner, requests, desc=desc)
        for phase, groups in zip(phases, real):
            self.tokens[phase] += generated_tokens(groups)
        self.tokens[shared] += sum(generated_tokens(groups) for groups in real)
        return [self.scripted(kind, prompts, params, groups)
                for kind, (prompts, params), groups in zip(kinds, requests, real)]

    def scripted(self, stage: str, prompts, params: SamplingParams, real) -> list[list[Completion]]:
        """The script's text for each of `real`'s sequences, about as long (in tokens), ending with eos; its time is
        the script's, left out of the step."""
        t1 = time.perf_counter()
        tok = self.script.tok
        out = []
        for position, (prompt, group) in enumerate(zip(prompts, real)):
            mixed = is_mixed(position, self.mixed) if stage == "sample" else True
            row = []
            for i, c in enumerate(group):
                text = self.script.write(prompt, i, max(1, min(len(c.token_ids), params.max_new_tokens) - 1), mixed)
                ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                if len(ids) > params.max_new_tokens:  # the length limit cuts it, as a real engine would
                    ids = ids[:params.max_new_tokens]
                    row.append(Completion(tok.decode(ids, skip_special_tokens=True), ids, "length"))
                else:
                    row.append(Completion(text, ids, "stop"))
            out.append(row)
        self.script_s += time.perf_counter() - t1
        return out


def generated_tokens(groups: list[list[Completion]]) -> int:
    return sum(len(c.token_ids) for g in groups for c in g)


def arm_config(a, arm: str, model_dir: Path, root: Path):
    ov = [f"run.name=gpu-step-{arm}", f"run.root_dir={root}", f"run.torch_threads={a.threads}", f"run.seed={a.seed}",
          f"model.name_or_path={model_dir}", f"model.dtype={a.dtype}", f"model.master_dtype={a.master_dtype}",
          f"model.device={a.device}",
          f"model.engine={a.engine}", f"model.vllm.kv_cache_gib={a.vllm_kv_cache_gib}",
          f"model.gradient_checkpointing={str(not a.no_gradient_checkpointing).lower()}",
          f"model.max_seq_len={a.max_seq_len}", f"prompts.dir={REPO / 'configs' / 'prompts' / 'tiny'}",
          f"sampling.prompts_per_step={a.prompts}", f"sampling.group_size={a.group_size}",
          f"sampling.max_new_tokens={a.max_new_tokens}", f"sampling.chunk_sequences={a.chunk_sequences}",
          f"experience.analysis_max_new_tokens={a.analysis_max_new_tokens}",
          f"experience.replay_max_new_tokens={a.replay_max_new_tokens}",
          f"optim.micro_batch_size={a.micro_batch_size}"]
    if arm == "grpo":
        ov += ["experience.enabled=false", "loss.nll_coef=0"]
    else:  # The analyses sample as the rollouts do (the tiny config's 0.7 would not): the HF engine shares chunks
        # only between requests of one temperature and top_p, and runs others one after the other (HFEngine.generate_many).
        ov += [f"experience.analysis_temperature={C.load(TINY_CONFIG).sampling.temperature}"]
    if arm == "mel-overlap":
        ov += ["orchestration.overlap=1"]
    return C.load(TINY_CONFIG, ov)


def mel_arm(a, arm: str, mixed: float, model_dir: Path, res: Result, log) -> None:
    """`--warmup` + `--steps` steps of mel's `arm` (grpo | mel | mel-overlap) from the base model, each step through
    the stage functions as a campaign runs them (flows/iteration.py), each trained version handed to the engine before
    the next step."""
    from mel_core.run import executions
    from mel_core.step import stages
    from mel_core.step.runtime import Runtime

    device = torch.device(a.device)
    clock = Clock(device)
    rt = Runtime(arm_config(a, arm, model_dir, Path(a.result).parent / f"runs-{arm}-{mixed:g}"))
    base = rt.base_checkpoint
    engine = BenchEngine(None, clock, mixed, base.checkpoint_id)
    if a.engine == "vllm":
        # As Runtime._build_engine builds it, plus gpu_memory_utilization: vLLM refuses to start when less than
        # that fraction of the device is free, and the policy is resident already (TRL's colocate default, 0.3).
        from mel_core.model.engines.vllm import VLLMEngine

        rt.use_engine(engine)
        rt.ensure_version(base)  # the policy alone: the engine is ours
        t0 = time.perf_counter()
        m = rt.cfg.model
        engine.inner = VLLMEngine(base.path, rt.policy.tokenizer, dtype=m.dtype, seed=rt.cfg.run.seed,
                                  kv_cache_gib=m.vllm.kv_cache_gib, progress=False, stop_ids=rt.stop_ids,
                                  gpu_memory_utilization=a.vllm_gpu_memory_utilization)
        res.data["engine_start_s"] = time.perf_counter() - t0
    else:
        rt.ensure_version(base)  # the policy, and the HF engine on the policy's own module: nothing to start
        engine.inner = rt.engine
        rt.use_engine(engine)
        rt.ensure_version(base)
    engine.script, engine.policy = Script(rt.policy.tokenizer), rt.policy
    executions.register_run(rt, base)

    policy = rt.policy
    train_step, save_checkpoint = policy.train_step, policy.save_checkpoint
    trained = collections.Counter()

    def timed_train_step(rl, nll, data_parallel=None):
        with clock.phase("train"):
            out = train_step(rl, nll, data_parallel)
        t0 = time.perf_counter()  # counting the tokens is the benchmark's: left out of the step, as the script is
        batches = [(rl.prompts, rl.completion_ids)] + ([(nll.prompts, nll.target_ids)] if nll and nll.prompts else [])
        trained["trained"] += sum(len(p) + len(c) for prompts, comps in batches
                                  for p, c in zip(policy.encode_prompts(prompts), comps))
        trained["scored"] += sum(len(c) for _, comps in batches for c in comps)
        trained["rl_sequences"] += len(rl.prompts)
        trained["nll_sequences"] += len(nll.prompts) if nll else 0
        engine.script_s += time.perf_counter() - t0
        return out

    def timed_save_checkpoint(path, update_stats=None):
        with clock.phase("save"):
            return save_checkpoint(path, update_stats=update_stats)

    policy.train_step, policy.save_checkpoint = timed_train_step, timed_save_checkpoint
    calls = {"sample": stages.sample, "verify": lambda rt, k, c: stages.verify(rt, k),
             "pair": lambda rt, k, c: stages.pair(rt, k), "diagnose": stages.diagnose, "abstract": stages.abstract,
             "replay": stages.replay, "update": stages.update}
    names = STAGES if arm in MEL_ARMS else GRPO_STAGES
    res.data["setup_s"] = time.perf_counter() - T_PROCESS
    log(f"setup {res.data['setup_s']:.1f}s (engine {a.engine}"
        + (f" started in {res.data['engine_start_s']:.1f}s)" if "engine_start_s" in res.data else ")"))
    ckpt = base
    for k in range(1, a.warmup + a.steps + 1):
        clock.take()
        engine.tokens.clear()
        trained.clear()
        engine.script_s = 0.0
        engine.calls.clear()
        plan = step_plan(names, k, stages.experience_step(rt, k), rt.start_step)
        _sync(device)
        t0 = time.perf_counter()
        manifests = {name: calls[name](rt, of, ckpt) for name, of in plan}
        _sync(device)
        step_s = time.perf_counter() - t0 - engine.script_s
        phases = {"weight_sync": 0.0, **clock.take()}  # HF: the engine generates with the trained module itself
        phases["other"] = step_s - sum(phases.values())
        counts = {"reward_mean": manifests["verify"]["reward_mean"], "mixed_groups": manifests["verify"]["mixed_groups"],
                  "pairs": manifests.get("pair", {}).get("pairs"),
                  # overlap: the analyses of step k-1's pairs, written in sample's shared call, and their replays
                  "analysed_step": stages.experience_step(rt, k) if arm in MEL_ARMS else None,
                  "diagnosed": manifests.get("diagnose", manifests["sample"]).get("diagnosed"),
                  "accepted": manifests.get("replay", {}).get("accepted")}
        res.step(log, k, k <= a.warmup, step_s, phases, {**engine.tokens, **trained}, script_s=engine.script_s,
                 counts=counts, engine_calls=list(engine.calls))
        new = manifests["update"]["checkpoint"]
        if ckpt is not base:
            shutil.rmtree(ckpt.path, ignore_errors=True)  # GBs at a real size: one checkpoint at a time
        ckpt = new
    res.data["memory"] = clock.memory()
    shutil.rmtree(rt.run_dir, ignore_errors=True)


def step_plan(names, step: int, analysed: int, start_step: int) -> list[tuple[str, int]]:
    """The stages step `step` runs, each with the step it works on, in flows/iteration.py's order. In sequence
    (`analysed` == `step`): every stage of `names` on `step`. With orchestration.overlap (`analysed` == step - 1):
    sample(step) generates step-1's analyses in its own call, so no diagnose; abstract and replay work on step-1,
    not at all at a campaign's first step (no earlier pairs); verify, pair and update on `step`."""
    if analysed == step:
        return [(name, step) for name in names]
    return [(name, analysed if name in ("abstract", "replay") else step) for name in names
            if name != "diagnose" and (analysed > start_step or name not in ("abstract", "replay"))]


# -------------------------------------------------------------------------------- TRL's arm


def step_prompts(a, n: int) -> list[str]:
    """The solve prompts of the synthetic training problems, as mel's arms render them (no chat template: the tiny
    tokenizer has none), `n` of them in order."""
    from mel_core.problems.sources import load_problems

    cfg = C.load(TINY_CONFIG, [f"prompts.dir={REPO / 'configs' / 'prompts' / 'tiny'}"])
    problems = load_problems(cfg.data, split="train")
    prompts = PromptSet.load(cfg.prompts.dir)
    return [prompts.render_solve(problems[i % len(problems)].question) for i in range(n)]


def trl_arm(a, mixed: float, model_dir: Path, res: Result, log) -> None:
    """TRL's GRPOTrainer for `--warmup` + `--steps` optimizer steps, each over one generation batch of B x G."""
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    device = torch.device(a.device)
    clock = Clock(device)
    B, G, steps = a.prompts, a.group_size, a.warmup + a.steps
    use_vllm = a.engine == "vllm"
    res.data["trl_version"] = trl.__version__

    def scripted_reward(completions, **kwargs):
        """Completion k of the generation batch is sample k % G of group k // G (TRL's batches hold whole groups in
        order): mixed groups score the even samples 1 and the odd ones 0, the others all 1."""
        return [float(k % G % 2 == 0) if is_mixed(k // G % B, mixed) else 1.0 for k in range(len(completions))]

    extra = dict(vllm_mode="colocate", vllm_gpu_memory_utilization=a.vllm_gpu_memory_utilization,
                 vllm_max_model_length=a.max_seq_len, generation_kwargs={"detokenize": False}) if use_vllm else {}
    args = GRPOConfig(
        output_dir=str(Path(a.result).parent / "trl-out"), report_to="none", save_strategy="no",
        use_cpu=device.type != "cuda", bf16=a.dtype == "bfloat16", model_init_kwargs={"dtype": a.master_dtype}, seed=a.seed, max_steps=steps,
        per_device_train_batch_size=a.micro_batch_size, gradient_accumulation_steps=B * G // a.micro_batch_size,
        num_generations=G, max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=C.load(TINY_CONFIG).optim.lr, gradient_checkpointing=not a.no_gradient_checkpointing,
        shuffle_dataset=False, disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
        use_vllm=use_vllm, **extra)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    tr = GRPOTrainer(model=str(model_dir), reward_funcs=scripted_reward, args=args, processing_class=tok,
                     train_dataset=Dataset.from_dict({"prompt": step_prompts(a, B * steps)}))
    res.data["engine_start_s"] = time.perf_counter() - t0  # the trainer, with its colocated vLLM engine
    for cb in (PrinterCallback, ProgressCallback):
        tr.remove_callback(cb)
    tokens = collections.Counter()

    generate_single_turn = tr._generate_single_turn

    def timed_generate_single_turn(*args_, **kwargs):
        with clock.phase("generate"):
            return generate_single_turn(*args_, **kwargs)

    generate_and_score = tr._generate_and_score_completions

    def timed_generate_and_score(inputs):
        with clock.phase("generate_and_score"):
            out = generate_and_score(inputs)
        completion, prompt = int(out["completion_mask"].sum()), int(out["prompt_mask"].sum())
        tokens.update(rollouts=completion, scored=completion, trained=prompt + completion,
                      rl_sequences=int(out["completion_mask"].size(0)))
        return out

    tr._generate_single_turn, tr._generate_and_score_completions = timed_generate_single_turn, timed_generate_and_score
    if use_vllm:
        sync_weights = tr.vllm_generation.sync_weights

        def timed_sync_weights():
            with clock.phase("weight_sync"):
                return sync_weights()

        tr.vllm_generation.sync_weights = timed_sync_weights

    class StepClock(TrainerCallback):
        """A step: from the end of the previous one (or the start of training) to the end of this one."""

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.t = time.perf_counter()
            clock.take()
            res.data["setup_s"] = self.t - T_PROCESS
            log(f"setup {res.data['setup_s']:.1f}s (trainer init with its engine: {res.data['engine_start_s']:.1f}s)")

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            now = time.perf_counter()
            step_s, self.t = now - self.t, now
            raw = clock.take()
            sync, gen, gen_score = raw.get("weight_sync", 0.0), raw.get("generate", 0.0), raw.get("generate_and_score", 0.0)
            phases = {"rollouts": gen - sync, "weight_sync": sync, "score": gen_score - gen,
                      "train": step_s - gen_score, "save": 0.0, "other": 0.0}
            k = state.global_step
            res.step(log, k, k <= a.warmup, step_s, phases, dict(tokens))
            tokens.clear()

    tr.add_callback(StepClock())
    tr.train()
    res.data["memory"] = clock.memory()


# -------------------------------------------------------------------------------- decode micro-benchmark


def decode_arm(a, engine: str, model_dir: Path, counts: dict, res: Result, log) -> None:
    """Prefill + decode of random prompts at each (batch, context): ms per decoding step and decoded tokens/s."""
    from transformers import AutoTokenizer

    device = torch.device(a.device)
    clock = Clock(device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(a.seed)
    T = a.decode_tokens
    prompts = lambda batch, ctx: [[rng.choice(ids) for _ in range(ctx)] for _ in range(batch)]
    t0 = time.perf_counter()
    if engine == "hf":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, a.dtype)).to(device).eval()

        def run(batch_ids, new):
            x = torch.tensor(batch_ids, device=device)
            with clock.phase("generate"), torch.no_grad():
                model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                               do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=tok.pad_token_id)
    else:
        from vllm import LLM
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        longest = max(a.decode_contexts) + T + 16
        need = int(1.25 * max(a.decode_batches) * longest * counts["kv_bytes_per_token"])  # no preemption
        llm = LLM(model=str(model_dir), dtype=a.dtype, seed=a.seed, skip_tokenizer_init=True, max_model_len=longest,
                  kv_cache_memory_bytes=max(need, int(a.vllm_kv_cache_gib * 2**30)), enable_prefix_caching=False,
                  gpu_memory_utilization=a.vllm_gpu_memory_utilization, enforce_eager=device.type != "cuda",
                  generation_config="vllm")

        def run(batch_ids, new):
            sp = VSamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=new, min_tokens=new,
                                 ignore_eos=True, detokenize=False, seed=a.seed)
            with clock.phase("generate"):
                llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch_ids], sp, use_tqdm=False)
    res.data["engine_start_s"] = time.perf_counter() - t0
    res.data["setup_s"] = time.perf_counter() - T_PROCESS
    run(prompts(min(a.decode_batches), min(a.decode_contexts)), 2)  # warm-up
    clock.take()
    rows = res.data["rows"] = []
    for ctx in a.decode_contexts:
        for batch in a.decode_batches:
            run(prompts(batch, ctx), 1)
            prefill = clock.take()["generate"]
            run(prompts(batch, ctx), T + 1)
            full = clock.take()["generate"]
            decode = max(full - prefill, 1e-9)
            rows.append({"batch": batch, "context": ctx, "tokens": T, "prefill_s": prefill, "full_s": full,
                         "step_ms": decode / T * 1000, "tokens_per_s": batch * T / decode})
            res.save()
            log(f"batch {batch} context {ctx}: prefill {prefill:.3f}s, {decode / T * 1000:.1f} ms per decoding step, "
                f"{batch * T / decode:,.0f} tok/s")
    res.data["memory"] = clock.memory()


# ------------------------------------------------------------------------------------- the child


def child_main(a) -> int:
    """One arm in this process: its results to `a.result` (JSON) after every step."""
    log = lambda m: print(m, flush=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamings, once per arm: noise here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    res = Result(a.result, arm=a.child, mixed=a.child_mixed, engine=a.engine, device=a.device, shape=a.shape,
                 pid=os.getpid())
    model_dir = Path(a.model_dir)
    try:
        if a.child == "build":
            res.data["counts"] = build_model_dir(a.shape, model_dir, getattr(torch, a.dtype), torch.device(a.device),
                                                 a.seed)
            if a.device.startswith("cuda"):
                res.data["counts"]["device_name"] = torch.cuda.get_device_name(torch.device(a.device))
        elif a.child == "trl":
            trl_arm(a, a.child_mixed, model_dir, res, log)
        elif a.child in ("grpo", *MEL_ARMS):
            mel_arm(a, a.child, a.child_mixed, model_dir, res, log)
        else:
            counts = json.loads((model_dir / "bench_counts.json").read_text())
            decode_arm(a, a.child.removeprefix("decode-"), model_dir, counts, res, log)
    except BaseException as e:
        res.data.update(status="crashed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        res.save()
        raise
    res.data["status"] = "done"
    res.save()
    return 0


# ------------------------------------------------------------------------------------- the parent


def run_child(a, argv: list[str], arm: str, mixed: float, model_dir: Path, work: Path, timeout: float, log) -> dict:
    """`arm` in a process of its own, its output echoed line by line; killed (its whole process group) at
    `timeout`. Returns its JSON, with the status the parent saw."""
    tag = f"{arm} {mixed * 100:g}%" if arm in STEP_ARMS else arm
    result = work / f"result-{arm}-{mixed:g}.json"
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), *argv, "--child", arm, "--child-mixed", str(mixed),
           "--model-dir", str(model_dir), "--result", str(result)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    log(f"[{tag}] started, {timeout:.0f}s of the budget left")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                            cwd=REPO, start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=20)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            log(f"  [{tag}] {line.rstrip()}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        cut = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the arm and what it started (vLLM's workers), nothing else
        try:
            rc = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    reader.join(timeout=5)
    data = {"arm": arm, "mixed": mixed, "steps": []}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - t0
    if cut:
        data["status"] = f"cut: its {timeout:.0f}s of the budget ran out"
    elif rc != 0 or data.get("status") != "done":
        data["status"] = f"crashed (exit {rc})"
        data["tail"] = list(tail)[-8:]
    log(f"[{tag}] {data['status']} after {data['wall_s']:.1f}s")
    return data


def summarize(r: dict, counts: dict, a) -> dict:
    """Median and min-max over the timed steps (the warm-up steps when none was timed) of each phase, the step,
    the step without its save, tokens/s and MFU."""
    steps = [s for s in r.get("steps", []) if not s["warmup"]]
    r["timed"] = bool(steps)
    steps = steps or r.get("steps", [])
    if not steps:
        return {}
    stat = lambda xs: (statistics.median(xs), min(xs), max(xs))
    out = {"n": len(steps), "step": stat([s["step_s"] for s in steps]),
           "step_without_save": stat([s["step_s"] - s["phases"].get("save", 0.0) for s in steps])}
    for p in PHASES:
        if any(p in s["phases"] for s in steps):
            out[p] = stat([s["phases"].get(p, 0.0) for s in steps])
    tokens = lambda s, k: s["tokens"].get(k, 0)
    out["generated"] = {p: statistics.median([tokens(s, p) for s in steps]) for p in GENERATED}
    rates = {p: [tokens(s, p) / s["phases"][p] for s in steps if s["phases"].get(p)] for p in out["generated"]}
    out["generated_per_s"] = {p: statistics.median(v) if v else None for p, v in rates.items()}
    out["trained"] = statistics.median([tokens(s, "trained") for s in steps])
    trains = [s for s in steps if s["phases"].get("train")]
    out["train_tokens_per_s"] = statistics.median([tokens(s, "trained") / s["phases"]["train"] for s in trains]) \
        if trains else None
    mfu, hfu = [], []
    for s in trains:
        flops, hw = model_flops(tokens(s, "trained"), tokens(s, "scored"), counts, not a.no_gradient_checkpointing)
        if a.peak_tflops:
            mfu.append(flops / s["phases"]["train"] / 1e12 / a.peak_tflops)
            hfu.append(hw / s["phases"]["train"] / 1e12 / a.peak_tflops)
    out["mfu"] = statistics.median(mfu) if mfu else None
    out["hfu"] = statistics.median(hfu) if hfu else None
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _range(t) -> str:
    return "n/a" if not t else f"{t[0]:.2f} ({t[1]:.2f}–{t[2]:.2f})"


def arm_table(r: dict, s: dict) -> list[str]:
    """One arm: its status, then each phase's median, min and max over its timed steps."""
    name = ARM_NAMES.get(r["arm"], r["arm"])
    mixed = f", mixed {r['mixed'] * 100:g}%" if r["arm"] in STEP_ARMS else ""
    head = (f"#### {name}{mixed}: {r.get('status')}; engine {r.get('engine')}; setup {_f(r.get('setup_s'), '{:.1f}')}s "
            f"(engine start {_f(r.get('engine_start_s'), '{:.1f}')}s); process {_f(r.get('wall_s'), '{:.0f}')}s")
    lines = [head, ""]
    if r.get("tail"):
        lines += ["```", *r["tail"], "```", ""]
    if r["arm"].startswith("decode"):
        rows = r.get("rows", [])
        lines += ["| batch | context | prefill s | ms per decoding step | decoded tok/s |", "|---|---|---|---|---|"]
        lines += [f"| {x['batch']} | {x['context']} | {x['prefill_s']:.3f} | {x['step_ms']:.1f} | {x['tokens_per_s']:,.0f} |"
                  for x in rows]
        return lines + [""]
    if not s:
        return lines + ["No step finished.", ""]
    which = f"{s['n']} timed step(s)" if r.get("timed") else f"{s['n']} warm-up step(s) only (no timed step finished)"
    lines += [f"Per step, over {which}:", "", "| phase | median s | min s | max s |", "|---|---|---|---|"]
    for p in PHASES:
        if p in s:
            lines.append(f"| {p.replace('_', ' ')} | {s[p][0]:.2f} | {s[p][1]:.2f} | {s[p][2]:.2f} |")
    lines.append(f"| **step** | **{s['step'][0]:.2f}** | {s['step'][1]:.2f} | {s['step'][2]:.2f} |")
    lines.append(f"| step without save | {s['step_without_save'][0]:.2f} | {s['step_without_save'][1]:.2f} | "
                 f"{s['step_without_save'][2]:.2f} |")
    shared = "rollouts+analyses" if s["generated"]["rollouts+analyses"] else None
    rate = lambda p: (f"at {_f(s['generated_per_s'][p], '{:,.0f}')} tok/s" if s["generated_per_s"][p] or not shared
                      else f"within {shared}")  # overlap: generated in the shared call, not timed apart
    gen = ", ".join(f"{p} {s['generated'][p]:,.0f} tokens {rate(p)}" for p in GENERATED if s["generated"][p])
    mem = r.get("memory") or {}
    last_step = (r.get("steps") or [{}])[-1]
    last = last_step.get("counts")
    imported = r.get("optional_modules_imported")
    lines += ["", f"- generated: {gen or 'none'}",
              f"- trained: {s['trained']:,.0f} tokens at {_f(s['train_tokens_per_s'], '{:,.0f}')} tok/s; update MFU "
              f"{_f(s['mfu'], '{:.1%}')} (6N), HFU {_f(s['hfu'], '{:.1%}')} (8N with recompute)",
              f"- peak memory: {_f(mem.get('peak_allocated_gib'))} GiB allocated by torch, "
              f"{_f(mem.get('peak_device_used_gib'))} GiB of the device in use",
              f"- optional modules imported: {', '.join(imported) or 'none'}" if imported is not None else ""]
    if last:
        k, analysed = last_step["step"], last.get("analysed_step")
        of = f" of step {analysed}'s pairs" if analysed is not None and analysed != k else ""
        none = lambda x: "no" if x is None else x
        lines.append(f"- last step ({k}): reward mean {last['reward_mean']:.2f}, {last['mixed_groups']} mixed groups"
                     + (f", {last['pairs']} pairs; {none(last['diagnosed'])} analyses parsed and "
                        f"{none(last['accepted'])} accepted{of}" if last.get("pairs") is not None else ""))
    if last_step.get("engine_calls") is not None:
        lines.append(f"- its engine calls: {'; '.join(last_step['engine_calls']) or 'none'}")
    return lines + [""]


def ratios(results: list[dict], summaries: list[dict], a, counts: dict) -> tuple[list[str], dict]:
    """The ratio lines against the goals, and the headline numbers."""
    by = {(r["arm"], r["mixed"]): s for r, s in zip(results, summaries) if s}
    first = a.mixed[0] / 100
    trl, grpo = by.get(("trl", first)), by.get(("grpo", first))
    cpu = a.device == "cpu"
    note = " (CPU dry run: the goals are for a GPU)" if cpu else ""

    def verdict(x, goal, le=True):
        if x is None or goal is None:
            return ""
        return f" — goal {'≤' if le else '≥'} {goal:g}: " + ("met" if (x <= goal if le else x >= goal) else "missed")

    def ratio(num, den, key):
        return num[key][0] / den[key][0] if num and den and den[key][0] > 0 else None

    lines, heads = [], {}
    ran = {r["arm"] for r in results}
    for key, label in (("step", "with save"), ("step_without_save", "without save")):
        x = ratio(grpo, trl, key)
        heads[f"mel_grpo_over_trl_{key}"] = x
        lines.append(f"- mel-GRPO ÷ TRL-GRPO, step {label}: **{_f(x)}**{verdict(x, GOALS['mel_grpo_over_trl'])}{note}")
    for m in a.mixed:
        for arm, name in (("mel", "MEL"), ("mel-overlap", "MEL overlap")):
            if arm not in ran:  # not asked for (a skipped or crashed arm is in `results`: its ratio reads n/a)
                continue
            for key, label in (("step", "with save"), ("step_without_save", "without save")):
                x = ratio(by.get((arm, m / 100)), grpo, key)
                heads[f"{arm.replace('-', '_')}_over_grpo_{m:g}_{key}"] = x
                goal = GOALS["mel_over_grpo_at_50"] if m == 50 else None
                lines.append(f"- {name} ÷ mel-GRPO at {m:g}% mixed, step {label}: **{_f(x)}**{verdict(x, goal)}"
                             + (note if goal else ""))
    mfus = [(arm, m, s["mfu"]) for (arm, m), s in by.items() if arm in STEP_ARMS]
    goal = GOALS["mfu_at_1_7b"] if a.shape == "1.7b" else None
    for arm, m, x in mfus:
        heads[f"update_mfu_{arm.replace('-', '_')}" + (f"_{m * 100:g}" if arm in MEL_ARMS else "")] = x
    shown = ", ".join(f"{ARM_NAMES[arm]}{f' {m * 100:g}%' if arm in MEL_ARMS else ''} {_f(x, '{:.1%}')}"
                      for arm, m, x in mfus)
    ours = [x for arm, _, x in mfus if arm != "trl"]
    met = "" if not (goal and ours) else \
        " — goal ≥ 35% at 1.7B (mel's arms): " + ("met" if all(x is not None and x >= goal for x in ours) else "missed")
    lines.append(f"- update MFU (6N, peak {_f(a.peak_tflops, '{:.0f}')} TFLOP/s): {shown or 'n/a'}{met}"
                 + ("" if a.peak_tflops else " (no --peak-tflops on CPU)"))
    for (arm, m), s in by.items():
        if arm in STEP_ARMS:
            heads[f"step_s_{arm.replace('-', '_')}" + (f"_{m * 100:g}" if arm in MEL_ARMS else "")] = s["step"][0]
    return lines, heads


def summary_table(results: list[dict], summaries: list[dict]) -> list[str]:
    lines = ["| arm | mixed | status | step s, median (min–max) | without save | rollouts | rollouts+analyses | "
             "analyses | replays | weight sync | score | train | save | other | rollout tok/s | train tok/s | MFU | "
             "peak GiB |", "|" + "---|" * 18]
    for r, s in zip(results, summaries):
        if r["arm"] not in STEP_ARMS:
            continue
        cell = lambda p: f"{s[p][0]:.2f}" if s and p in s else "—"
        mem = (r.get("memory") or {}).get("peak_allocated_gib")
        lines.append(f"| {ARM_NAMES[r['arm']]} | {r['mixed'] * 100:g}% | {r.get('status')} | {_range(s.get('step'))} | "
                     f"{cell('step_without_save')} | " + " | ".join(cell(p) for p in PHASES) + " | "
                     f"{_f(s['generated_per_s']['rollouts'], '{:,.0f}') if s else '—'} | "
                     f"{_f(s['train_tokens_per_s'], '{:,.0f}') if s else '—'} | "
                     f"{_f(s['mfu'], '{:.1%}') if s else '—'} | {_f(mem)} |")
    return lines + [""]


def decode_table(results: list[dict]) -> list[str]:
    """HF against vLLM at each (batch, context) both measured: ms per decoding step and vLLM's speed-up."""
    rows = {r["arm"]: {(x["batch"], x["context"]): x for x in r.get("rows", [])} for r in results
            if r["arm"].startswith("decode")}
    hf, vllm = rows.get("decode-hf", {}), rows.get("decode-vllm", {})
    if not hf and not vllm:
        return []
    lines = ["| batch | context | HF ms/step | vLLM ms/step | HF tok/s | vLLM tok/s | vLLM ÷ HF tok/s |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(set(hf) | set(vllm), key=lambda k: (k[1], k[0])):
        h, v = hf.get(key), vllm.get(key)
        lines.append(f"| {key[0]} | {key[1]} | {_f(h and h['step_ms'], '{:.1f}')} | {_f(v and v['step_ms'], '{:.1f}')} | "
                     f"{_f(h and h['tokens_per_s'], '{:,.0f}')} | {_f(v and v['tokens_per_s'], '{:,.0f}')} | "
                     f"{_f(h and v and v['tokens_per_s'] / h['tokens_per_s'])} |")
    return lines + [""]


def _workdir(a) -> tempfile.TemporaryDirectory:
    if a.workdir:
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="mel-gpu-step-", dir=a.workdir)
    shm = Path("/dev/shm")
    if a.device.startswith("cuda") and shm.is_dir() and shutil.disk_usage(shm).free > 48 * 2**30:
        return tempfile.TemporaryDirectory(prefix="mel-gpu-step-", dir=shm)
    return tempfile.TemporaryDirectory(prefix="mel-gpu-step-")


def previous_versions(doc: Path = DOC) -> list[str]:
    """The '### Previous script version' block of this script's section, carried over when it is rewritten."""
    if not doc.exists():
        return []
    m = re.search(r"^## gpu_step\.py[ \t]*\n(.*?)(?=^## |\Z)", doc.read_text(), re.S | re.M)
    if not m:
        return []
    i = m.group(1).find("### Previous script version")
    return m.group(1)[i:].rstrip().splitlines() if i >= 0 else []


def parent_main(a, argv: list[str]) -> dict:
    log = lambda m: print(m, flush=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    gpu = a.device.startswith("cuda")
    # On a GPU the parent never initialises CUDA (the arms get the whole device): the build process names it.
    device_name = "a GPU" if gpu else f"CPU, {a.threads} thread(s) per arm"
    log(f"gpu_step {a.mode}: {device_name}; shape {a.shape}; B={a.prompts} x G={a.group_size}; new tokens "
        f"{a.max_new_tokens}/{a.analysis_max_new_tokens}/{a.replay_max_new_tokens}; {a.dtype} compute over {a.master_dtype} master weights; engine {a.engine}; "
        f"{a.warmup} warm-up + {a.steps} timed steps; mixed {' '.join(f'{m:g}%' for m in a.mixed)}; "
        f"budget {a.budget_s:.0f}s; torch {torch.__version__}")
    results: list[dict] = []
    with _workdir(a) as d:
        work = Path(d)
        model_dir = work / f"model-{a.shape}"
        t0 = time.perf_counter()
        if gpu:  # initialised on the GPU in a process of its own: the parent holds no CUDA context
            built = run_child(a, argv, "build", 0.0, model_dir, work, deadline - time.perf_counter(), log)
            counts = built.get("counts")
            if not counts:
                raise SystemExit(f"the model could not be built: {built['status']}")
            device_name = counts.get("device_name", device_name)
        else:
            counts = build_model_dir(a.shape, model_dir, getattr(torch, a.dtype), torch.device("cpu"), a.seed)
        (model_dir / "bench_counts.json").write_text(json.dumps(counts))
        log(f"model on {device_name}: {counts['parameters'] / 1e6:,.1f}M parameters ({counts['embedding'] / 1e6:,.1f}M tied embedding), "
            f"built in {time.perf_counter() - t0:.1f}s")

        # Every arm at the first fraction, then MEL and MEL overlap side by side at each further one while the
        # budget lasts (a cut budget leaves matched pairs).
        plan = ([(arm, a.mixed[0] / 100) for arm in STEP_ARMS if arm in a.arms]
                + [(arm, m / 100) for m in a.mixed[1:] for arm in MEL_ARMS if arm in a.arms])
        if a.mode == "decode" or "decode" in a.arms:
            plan += [("decode-hf", 0.0), ("decode-vllm", 0.0)]
        if a.mode == "decode":
            plan = [p for p in plan if p[0].startswith("decode")]
        first_wall: dict[str, float] = {}  # each MEL arm's first process, to judge whether another fits
        for arm, mixed in plan:
            left = deadline - time.perf_counter() - 5
            skip = None
            if arm == "decode-vllm" and importlib.util.find_spec("vllm") is None:
                skip = "skipped: vLLM is not installed"
            elif left < (30 if gpu else 5):
                skip = "skipped: no time left in the budget"
            elif arm in first_wall and first_wall[arm] * 1.1 > left:
                skip = f"skipped: {left:.0f}s left, the first {ARM_NAMES[arm]} arm took {first_wall[arm]:.0f}s"
            if skip:
                log(f"[{arm}{f' {mixed * 100:g}%' if arm in STEP_ARMS else ''}] {skip}")
                results.append({"arm": arm, "mixed": mixed, "status": skip, "steps": []})
                continue
            r = run_child(a, argv, arm, mixed, model_dir, work, left, log)
            if arm in MEL_ARMS:
                first_wall.setdefault(arm, r["wall_s"])
            results.append(r)
            log("\n".join(arm_table(r, summarize(r, counts, a))))
    summaries = [summarize(r, counts, a) for r in results]
    lines = []
    if any(r["arm"] in STEP_ARMS for r in results):
        lines += ["### Summary (medians over the timed steps; seconds)", "", *summary_table(results, summaries)]
        ratio_lines, heads = ratios(results, summaries, a, counts)
        lines += ["### Ratios", "", *ratio_lines, ""]
    else:
        heads = {}
    if any(r["arm"].startswith("decode") for r in results):
        lines += ["### Decode: HF generate vs vLLM", "", *decode_table(results)]
    wall = time.perf_counter() - t_start
    lines += [f"- Whole run: {wall:.0f}s of a {a.budget_s:.0f}s budget", ""]
    log("\n".join(lines))
    prefix = "gpu_step_" + a.shape.replace(".", "_") + "_"
    for k, v in heads.items():
        print(f"{prefix}{k}: {_f(v, '{:.4g}')}", flush=True)
    if a.doc:
        import transformers
        previous = previous_versions()
        where = (f"Ran on {device_name}." if gpu else
                 "**This version of the script has been dry-run on CPU only** (the micro shape, HF generation, TRL "
                 "without vLLM): no GPU number of it exists yet. The run below shows it working end to end; its "
                 "seconds say nothing about a GPU, and on shared cores they are noisy.")
        if previous:
            where += " The H200 numbers at the end are from the previous version of the script."
        details = [ln for r, s in zip(results, summaries) for ln in arm_table(r, s)]
        cmd = "python benchmarks/gpu_step.py" + "".join(" " + x for x in argv)
        write_section("gpu_step.py", cmd, [where, "", *lines, "### Per arm", "", *details, *previous],
                      f"torch {torch.__version__}", f"transformers {transformers.__version__}")
    return {"results": results, "summaries": summaries, "headline": heads, "wall_s": wall, "counts": counts}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", default="bench", choices=["bench", "decode"],
                    help="bench: the arms (default); decode: the decode micro-benchmark alone")
    ap.add_argument("--shape", choices=list(SHAPES), help="model shape (default: 1.7b on a GPU, micro on CPU)")
    ap.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU) | cuda | cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype (model.dtype)")
    ap.add_argument("--master-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and AdamW state (model.master_dtype; TRL: the dtype it loads, bf16 autocast on "
                         "top, its own default); the H200 numbers of docs/BENCHMARKS.md were bfloat16 master weights")
    ap.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm"],
                    help="generation of every arm: auto = vllm on a GPU where vLLM is installed, else hf "
                         "(TRL: use_vllm=True with vllm_mode colocate, or transformers generate)")
    ap.add_argument("--arms", nargs="+", default=list(STEP_ARMS), choices=[*STEP_ARMS, "decode"],
                    help="the arms to run (default: all but decode)")
    ap.add_argument("--mixed", nargs="+", type=float, metavar="PERCENT",
                    help="percent of mixed groups; the first for every arm, the others for MEL only while the budget "
                         "lasts (default: 50 25 100 on a GPU, 50 on CPU)")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    d = "(default: {gpu} on a GPU, {cpu} on CPU)"
    for name, help_, kind in (("prompts", "prompts per step B", int), ("group_size", "rollouts per prompt G", int),
                              ("max_new_tokens", "rollout tokens", int), ("analysis_max_new_tokens", "analysis tokens", int),
                              ("replay_max_new_tokens", "replay tokens", int),
                              ("micro_batch_size", "sequences per forward/backward (mel and TRL)", int),
                              ("warmup", "untimed steps per arm", int), ("steps", "timed steps per arm", int),
                              ("budget_s", "seconds for the whole run; arms that would start past it are skipped, "
                                           "one running at it is cut", float),
                              ("decode_tokens", "decode: tokens sampled past the prefill", int)):
        ap.add_argument("--" + name.replace("_", "-"), type=kind,
                        help=f"{help_} {d.format(gpu=GPU_DEFAULTS[name], cpu=CPU_DEFAULTS[name])}")
    ap.add_argument("--decode-batches", nargs="+", type=int, help="decode: batch sizes (default: 16 128 on a GPU)")
    ap.add_argument("--decode-contexts", nargs="+", type=int, help="decode: prompt lengths (default: 300 800 on a GPU)")
    ap.add_argument("--max-seq-len", type=int, default=0,
                    help="model.max_seq_len; 0 = 2 rollouts + an analysis + 128 (the retrospective context fits whole)")
    ap.add_argument("--chunk-sequences", type=int, default=256, help="sampling.chunk_sequences (HF: sequences per generate)")
    ap.add_argument("--vllm-kv-cache-gib", type=float, default=8.0, help="mel's vLLM engine: model.vllm.kv_cache_gib")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                    help="vLLM's gpu_memory_utilization (TRL colocate: its KV cache; mel: the free fraction vLLM "
                         "requires at start, its KV cache being --vllm-kv-cache-gib); TRL's default 0.3")
    ap.add_argument("--peak-tflops", type=float, help=f"the device's dense peak for MFU (default on a GPU: "
                    f"{DENSE_BF16_TFLOPS:.0f}, an H100 SXM's or H200's dense bf16; none on CPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads per arm (default: 1 on CPU, torch's own on a GPU host)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where the model and the runs go (default: /dev/shm if it has room, else $TMPDIR)")
    ap.add_argument("--doc", dest="doc", action="store_true", default=None,
                    help="write docs/BENCHMARKS.md's section (default on a GPU)")
    ap.add_argument("--no-doc", dest="doc", action="store_false")
    for name in ("--child", "--model-dir", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--child-mixed", type=float, default=0.5, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = a.device.startswith("cuda")
    for name, value in (GPU_DEFAULTS if gpu else CPU_DEFAULTS).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.engine == "auto":
        a.engine = "vllm" if gpu and importlib.util.find_spec("vllm") is not None else "hf"
    if a.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        ap.error("--engine vllm: vLLM is not installed")
    if (a.prompts * a.group_size) % a.micro_batch_size:
        ap.error("--micro-batch-size must divide B x G (TRL accumulates whole micro-batches into one step)")
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be at least 1 and --warmup at least 0")
    a.max_seq_len = a.max_seq_len or 2 * a.max_new_tokens + a.analysis_max_new_tokens + 128
    if a.threads is None:
        a.threads = 0 if gpu else 1
    if a.peak_tflops is None and gpu:
        a.peak_tflops = DENSE_BF16_TFLOPS
    if a.doc is None:
        a.doc = gpu and not a.child
    return a


def main(argv=None) -> dict | int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        return child_main(a)
    return parent_main(a, argv)


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
