"""The embedded tiny model: its tokenizer, its Qwen2 architecture, and its warm start.

No model can be downloaded here, so ``model.name_or_path: tiny`` builds one (docs/DESIGN.md, "The embedded worlds and the tiny model"): a
byte-level BPE tokenizer trained on the synthetic task's texts, a ~1M-parameter Qwen2 model, and a
short warm start on three kinds of examples, all rendered with the configured (tiny) prompt set:

- solve: solve prompt -> step-by-step solution (the task GRPO then trains on);
- analysis: analysis prompt (wrong solution first, right one second) -> the compact
  ``Bifurcation / Critique / Heuristic`` analysis, so the policy can write parseable meta-experience;
- validation: validation prompt with a heuristic in context -> the solution (the replay's format).

The result is saved with ``save_pretrained`` like any HF checkpoint, so everything downstream is the
code a real-model run uses. :func:`ensure_warm_start` caches it under ``run.cache_dir`` by a key of
exactly the config that shapes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from mel_core import progress
from mel_core.algorithm import retrospective
from mel_core.algorithm.rewards.synthetic import verify_synthetic
from mel_core.atomic_files import write_dir_atomically
from mel_core.config import MelConfig, SyntheticConfig, TinyModelConfig
from mel_core.problems import worlds
from mel_core.problems.problem import Problem
from mel_core.problems.prompts import PromptSet
from mel_core.tokens import encode_completions, encode_prompts

# Bump when the warm-start code changes what it builds, so cached models of the old code are not reused.
WARM_START_VERSION = 2
EOS_TOKEN = "<|endoftext|>"
# Qwen2's pre-tokenizer split: transformers 5 rebuilds a qwen2 folder's tokenizer with exactly this
# regex, ByteLevel and NFC, so the tokenizer is trained with the same pipeline to reload identically.
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SUMMARY_FILE = "warm_start.json"
ANALYSIS_MAX_NEW_TOKENS = 96
PARSE_RATE_PROMPTS = 48
MICRO_BATCH_TOKENS = 1024  # padded tokens per forward pass in warm-start training
TOKENIZER_CORPUS_SIZE = 2000  # examples the BPE merges are learned from (a few seconds)

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------ examples


@dataclass(frozen=True)
class Example:
    kind: str  # solve | analysis | validation
    prompt: str
    target: str  # the completion the loss is on (eos is appended at encoding)


def solve_example(prompts: PromptSet, world, synthetic: SyntheticConfig, question: str, rng: random.Random) -> Example:
    """The solve prompt -> the solution the world's warm start teaches (the correct one, or one that follows
    the world's weak rules only part of the time)."""
    return Example("solve", prompts.render_solve(question),
                   "\n".join(world.taught_solution_lines(synthetic, question, rng)))


def _injected_analysis(prompts: PromptSet, world, question: str, rng: random.Random,
                       exclude: frozenset[str] = frozenset()) -> tuple[Example, str] | None:
    """An injected error of a random applicable type (not in `exclude`), its analysis, and the type; None if no
    type applies."""
    types = [t for t in world.error_types if t not in exclude]
    rng.shuffle(types)
    for error_type in types:
        injected = world.inject_error(question, error_type, rng)
        if injected is not None:
            wrong_lines, _ = injected
            right_lines = world.solution_lines(question)
            prompt = prompts.render_analysis(question, "\n".join(wrong_lines), "\n".join(right_lines))
            return Example("analysis", prompt, world.analysis_target(wrong_lines, right_lines, error_type)), error_type
    return None


def analysis_example(prompts: PromptSet, world, question: str, rng: random.Random,
                     exclude: frozenset[str] = frozenset()) -> Example | None:
    """An injected error of a random applicable type (not in `exclude`), and its analysis; None if no type applies."""
    injected = _injected_analysis(prompts, world, question, rng, exclude)
    return None if injected is None else injected[0]


def validation_example(prompts: PromptSet, world, synthetic: SyntheticConfig, question: str, rng: random.Random,
                       replay_context: str = "full") -> Example | None:
    """Solving with a meta-experience about this problem in context (the replay's prompt): the whole analysis of
    an injected error (experience.replay_context full), or its heuristic alone (heuristics). The solution follows
    the rule that analysis states, weak or not, and any other weak rule only as often as a solve example does: a
    hint carries information, so the right lesson in context raises accuracy and another one does not."""
    injected = _injected_analysis(prompts, world, question, rng)
    if injected is None:
        return None
    analysis, error_type = injected
    hint = analysis.target if replay_context == "full" else analysis.target.splitlines()[-1].removeprefix("Heuristic: ")
    solution = world.taught_solution_lines(synthetic, question, rng, stated_rule=error_type)
    return Example("validation", prompts.render_validation(question, hint), "\n".join(solution))


def lessons_left_out(synthetic: SyntheticConfig, analysis_lessons: str) -> frozenset[str]:
    """The error types whose analyses the warm start never shows (warm_start.analysis_lessons): none, or with
    strong_only the world's weak rules."""
    if analysis_lessons == "all":
        return frozenset()
    return frozenset(worlds.get(synthetic.world).weak_rules(synthetic))


def example_stream(prompts: PromptSet, synthetic: SyntheticConfig, analysis_fraction: float,
                   validation_fraction: float, rng: random.Random, replay_context: str = "full",
                   analysis_lessons: str = "all"):
    """An endless seeded mixture of the three kinds, on fresh questions of the world outside its held-out split.
    With analysis_lessons strong_only the analysis examples analyse only errors of rules that are not weak, so no
    target ever states a weak rule's lesson (the validation prompts still hold every lesson in context)."""
    world = worlds.get(synthetic.world)
    exclude = lessons_left_out(synthetic, analysis_lessons)
    while True:
        question = world.random_train_question(synthetic, rng)
        u = rng.random()
        if u < analysis_fraction:
            ex = analysis_example(prompts, world, question, rng, exclude)
        elif u < analysis_fraction + validation_fraction:
            ex = validation_example(prompts, world, synthetic, question, rng, replay_context)
        else:
            ex = solve_example(prompts, world, synthetic, question, rng)
        if ex is not None:
            yield ex


# ----------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(tiny_cfg: TinyModelConfig, corpus: list[str]):
    """Byte-level BPE (Qwen pre-tokenizer) trained on `corpus`, as a left-padding PreTrainedTokenizerFast.

    Every byte is in the alphabet, so any (NFC) text round-trips exactly, also after a reload through
    AutoTokenizer from a folder holding a qwen2 config (STACK.md: the tokenizer trap). ``tokenizer: words``
    learns merges until every piece the pre-tokenizer cuts from `corpus` -- a word with its leading space, a
    digit, a run of punctuation -- is one token (at most ``vocab_size`` tokens): a word-level vocabulary that
    is still byte-level BPE, so it reloads the same way.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    words = tiny_cfg.tokenizer == "words"
    trainer = trainers.BpeTrainer(vocab_size=tiny_cfg.vocab_size, special_tokens=[EOS_TOKEN],
                                  min_frequency=1 if words else 2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   padding_side="left", model_max_length=tiny_cfg.max_position_embeddings)


def tokenizer_corpus(prompts: PromptSet, synthetic: SyntheticConfig, size: int, seed: int) -> list[str]:
    """Texts the tokenizer learns its merges from: every kind of example, every heuristic, and the marker of a
    shortened retrospective context (a few tokens rather than one per letter)."""
    rng = random.Random(f"tokenizer:{seed}")
    stream = example_stream(prompts, synthetic, 1 / 3, 1 / 3, rng)
    texts = [ex.prompt + ex.target for ex in (next(stream) for _ in range(size))]
    markers = [retrospective.MARKER.format(n=rng.randint(1, 999)) for _ in range(20)]
    return texts + list(worlds.get(synthetic.world).error_types.values()) + markers


# --------------------------------------------------------------------------------------------- model


def build_model(tiny_cfg: TinyModelConfig, tokenizer):
    """A freshly initialised Qwen2ForCausalLM of the tiny shape; untied embeddings (the warm start is keyed on this shape)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    eos = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=tiny_cfg.hidden_size, num_hidden_layers=tiny_cfg.num_layers,
        num_attention_heads=tiny_cfg.num_heads, num_key_value_heads=tiny_cfg.num_kv_heads,
        intermediate_size=tiny_cfg.intermediate_size, max_position_embeddings=tiny_cfg.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = eos
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- training


def tokenize_examples(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + eos) per example.

    Prompt and target are tokenized separately, exactly as generation sees them: the prompt alone,
    then the model's own continuation.
    """
    eos = tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, [ex.prompt for ex in examples])
    target_ids = encode_completions(tokenizer, [ex.target for ex in examples])
    return [(p, t + [eos]) for p, t in zip(prompt_ids, target_ids)]


def pad_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [prompt | target] ids, attention mask, and labels (-100 outside the target)."""
    length = max(len(p) + len(t) for p, t in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros((len(seqs), length), dtype=torch.long)  # [B, L]
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)  # [B, L]
    for row, (p, t) in enumerate(seqs):
        n = len(p) + len(t)
        input_ids[row, :n] = torch.tensor(p + t)
        attention[row, :n] = 1
        labels[row, len(p):n] = torch.tensor(t)
    return input_ids, attention, labels


def micro_batches(seqs: list[tuple[list[int], list[int]]], max_tokens: int) -> list[list[tuple[list[int], list[int]]]]:
    """Length-sorted groups of at most `max_tokens` padded tokens each.

    Short solve examples are then not padded to the length of analysis prompts, and each forward
    pass is large enough to use the cores well (about 1.5x the throughput of one padded batch on CPU).
    """
    ordered = sorted(seqs, key=lambda s: len(s[0]) + len(s[1]))
    groups: list[list] = [[]]
    for seq in ordered:
        longest = len(seq[0]) + len(seq[1])  # sorted: the newcomer is the longest of its group
        if groups[-1] and longest * (len(groups[-1]) + 1) > max_tokens:
            groups.append([])
        groups[-1].append(seq)
    return groups


def _summed_target_loss(model, input_ids, attention, labels) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over target positions, and how many there are."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]  # [B, L-1, V]
    targets = labels[:, 1:]  # [B, L-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def train_step(model, tokenizer, examples: list[Example], optimizer, scheduler,
               micro_batch_tokens: int = MICRO_BATCH_TOKENS) -> float:
    """One optimizer step on the token-mean target loss of `examples` (gradients summed over micro-batches)."""
    groups = micro_batches(tokenize_examples(tokenizer, examples), micro_batch_tokens)
    total_tokens = sum(len(t) for group in groups for _, t in group)
    loss_value = 0.0
    for group in groups:
        loss_sum, _ = _summed_target_loss(model, *pad_sequences(group, tokenizer.pad_token_id))
        (loss_sum / total_tokens).backward()
        loss_value += loss_sum.item() / total_tokens
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, floor: float = 0.1):
    """Linear warmup to the peak, then cosine decay to `floor` x peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -------------------------------------------------------------------------------------- measurement


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions (text up to eos) with the campaign's own engine."""
    from mel_core.model.engines.base import SamplingParams
    from mel_core.model.engines.hf import HFEngine

    groups = HFEngine(model, tokenizer).generate(prompts, SamplingParams(n=1, temperature=0.0,
                                                                         max_new_tokens=max_new_tokens))
    return [c.text for (c,) in groups]


_ANALYSIS_LINES = (re.compile(r"^Bifurcation: step \d+$"), re.compile(r"^Critique: \S.*$"),
                   re.compile(r"^Heuristic: If [^\d]+, then [^\d]+$"))


def is_parseable_analysis(text: str) -> bool:
    """All three lines in order, the heuristic an If/then rule holding no digits."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return len(lines) >= 3 and all(p.match(line) for p, line in zip(_ANALYSIS_LINES, lines[:3]))


def solve_rewards(model, tokenizer, prompts: PromptSet, problems: list[Problem], max_new_tokens: int) -> list[float]:
    """Greedy reward per problem, verified as the campaign verifies the synthetic task (mel_core.algorithm.rewards)."""
    texts = greedy_generate(model, tokenizer, [prompts.render_solve(p.question) for p in problems], max_new_tokens)
    return [verify_synthetic(t, p.answer).reward for t, p in zip(texts, problems)]


def accuracy_by_subset(problems: list[Problem], rewards: list[float]) -> dict[str, float]:
    """Mean reward per named subset (Problem.meta["subset"]) of the problems that have one."""
    groups: dict[str, list[float]] = {}
    for p, r in zip(problems, rewards):
        if p.meta.get("subset"):
            groups.setdefault(p.meta["subset"], []).append(r)
    return {name: sum(rs) / len(rs) for name, rs in sorted(groups.items())}


def measure_analysis(model, tokenizer, prompts: PromptSet, world, problems: list[Problem], seed: int) -> dict:
    """Parse rate of greedy analyses of held-out injected errors, and how often they name the right step/rule."""
    rng = random.Random(f"analysis-eval:{seed}")
    examples = [ex for ex in (analysis_example(prompts, world, p.question, rng) for p in problems) if ex is not None]
    if not examples:
        return {"analysis_parse_rate": 0.0, "analysis_step_accuracy": 0.0, "analysis_rule_accuracy": 0.0}
    texts = greedy_generate(model, tokenizer, [ex.prompt for ex in examples], ANALYSIS_MAX_NEW_TOKENS)
    def line(text: str, k: int) -> str:
        lines = text.strip().splitlines()
        return lines[k].strip() if len(lines) > k else ""
    n = len(examples)
    return {
        "analysis_parse_rate": sum(is_parseable_analysis(t) for t in texts) / n,
        "analysis_step_accuracy": sum(line(t, 0) == line(ex.target, 0) for t, ex in zip(texts, examples)) / n,
        "analysis_rule_accuracy": sum(line(t, 2) == line(ex.target, 2) for t, ex in zip(texts, examples)) / n,
    }


# ---------------------------------------------------------------------------------------- warm start


def warm_start_key(cfg: MelConfig) -> str:
    """Hash of exactly what shapes the warm start: tiny shape, warm_start, data.synthetic, prompt texts."""
    prompts = PromptSet.load(cfg.prompts.dir)
    warm = asdict(cfg.warm_start)
    if warm["analysis_lessons"] == "all":  # the default leaves the key of every warm start built before it as it was
        del warm["analysis_lessons"]
    shaping = {
        "version": WARM_START_VERSION,
        "tiny": asdict(cfg.model.tiny),
        "warm_start": warm,
        "synthetic": asdict(cfg.data.synthetic),
        "prompts": prompts.core(),  # the two_pass-only templates do not shape the warm start
        "replay_context": cfg.experience.replay_context,  # what the validation examples put in context
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def warm_start(cfg: MelConfig, out_dir: Path, log: Log = print) -> dict:
    """Build tokenizer + model, train on the example mixture, measure, save atomically into `out_dir`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would break the campaign's output
    t0, cpu0 = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    ws, synthetic = cfg.warm_start, cfg.data.synthetic
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    prompts = PromptSet.load(cfg.prompts.dir)
    key = warm_start_key(cfg)

    tokenizer = build_tokenizer(cfg.model.tiny, tokenizer_corpus(prompts, synthetic, TOKENIZER_CORPUS_SIZE, ws.seed))
    with torch.random.fork_rng(devices=[]):  # seed the build without disturbing the caller's torch RNG
        torch.manual_seed(ws.seed)
        model, train_seconds = _train(cfg, prompts, tokenizer, key, t0, log)

    world = worlds.get(synthetic.world)
    held_out = world.problems(synthetic, "eval")
    measured = held_out[:ws.eval_problems]
    rewards = solve_rewards(model, tokenizer, prompts, measured, cfg.sampling.max_new_tokens)
    accuracy = sum(rewards) / max(1, len(rewards))
    by_subset = accuracy_by_subset(measured, rewards)  # per rule, in a world whose split is partitioned by rule
    analysis = measure_analysis(model, tokenizer, prompts, world, held_out[:min(PARSE_RATE_PROMPTS, ws.eval_problems)],
                                ws.seed)
    summary = {"accuracy": accuracy, **({"accuracy_by_subset": by_subset} if by_subset else {}), **analysis,
               "seconds": round(time.perf_counter() - t0, 1),
               "cpu_seconds": round(time.process_time() - cpu0, 1), "train_seconds": round(train_seconds, 1),
               "torch_threads": torch.get_num_threads(), "steps": ws.steps, "key": key,
               "parameters": count_parameters(model)}
    per_subset = "".join(f", {name} {value:.3f}" for name, value in by_subset.items())
    log(f"warm start done: greedy accuracy {accuracy:.3f} on {len(measured)} held-out problems{per_subset}, "
        f"analysis parse rate {analysis['analysis_parse_rate']:.3f}, {summary['seconds']}s")
    _save_atomically(model, tokenizer, summary, out_dir)
    return summary


def _train(cfg: MelConfig, prompts: PromptSet, tokenizer, key: str, t0: float, log: Log):
    """The warm-start optimisation: AdamW, warmup + cosine, `warm_start.steps` steps of the example mixture."""
    ws = cfg.warm_start
    model = build_model(cfg.model.tiny, tokenizer)
    model.train()
    log(f"warm start {key}: {count_parameters(model) / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
        f"{ws.steps} steps x {ws.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, ws.warmup_steps, ws.steps)
    stream = example_stream(prompts, cfg.data.synthetic, ws.analysis_fraction, ws.validation_fraction,
                            random.Random(f"warm-start:{ws.seed}"), replay_context=cfg.experience.replay_context,
                            analysis_lessons=ws.analysis_lessons)
    recent: list[float] = []
    bar = progress.bar(total=ws.steps, desc="warm start")  # on a terminal only; the log lines stay
    for step in range(1, ws.steps + 1):
        recent.append(train_step(model, tokenizer, [next(stream) for _ in range(ws.batch_size)], optimizer, scheduler))
        bar.update(1)
        if step % 50 == 0 or step == ws.steps:
            progress.log_above(bar, log, f"warm start step {step}/{ws.steps}: loss {sum(recent) / len(recent):.4f} "
                                         f"({time.perf_counter() - t0:.0f}s)")
            recent = []
    bar.close()
    model.eval()
    return model, time.perf_counter() - t0


def _save_atomically(model, tokenizer, summary: dict, out_dir: Path) -> None:
    """Model, tokenizer and summary renamed into place together: a reader never sees half a warm start."""
    if out_dir.exists() and not (out_dir / SUMMARY_FILE).exists():
        shutil.rmtree(out_dir)  # left by an interrupted build of older code: incomplete, never read

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    write_dir_atomically(out_dir, write)  # if another process finished first, its equivalent result is kept


def warm_start_dir(cfg: MelConfig) -> Path:
    return (Path.cwd() / cfg.run.cache_dir / f"tiny-{warm_start_key(cfg)}").resolve()


def ensure_warm_start(cfg: MelConfig, log: Log = print) -> Path:
    """The warm-started tiny model's folder under ``run.cache_dir``, trained only if it is not there yet."""
    path = warm_start_dir(cfg)
    if (path / SUMMARY_FILE).exists():
        log(f"warm start cached: {path}")
        return path
    warm_start(cfg, path, log=log)
    return path


def read_summary(path: Path) -> dict:
    return json.loads((Path(path) / SUMMARY_FILE).read_text())
