"""Structured configuration: one dataclass per section, every field documented.

Each field carries ``metadata={"help": ..., "source": ...}`` where ``source`` is ``"paper"`` when the
MEL paper (arXiv 2602.10224) or the RLVR literature it builds on fixes the value, and ``"choice"``
when the paper is silent and the value is ours. ``mel_core.config.describe()`` prints them all.

Loading is ``schema <- extends-chain of YAML files <- key=value overrides``; an unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key and the file it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mel_core.errors import PermanentError

PAPER = "paper"
CHOICE = "choice"


def doc(default: Any, help: str, source: str = CHOICE, **kw) -> Any:
    """A dataclass field with a one-line doc and where its value comes from (paper or our choice)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "source": source}, **kw)
    return field(default=default, metadata={"help": help, "source": source}, **kw)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "source": CHOICE})


class ConfigError(PermanentError, ValueError):
    """A configuration problem, with the offending key and the file (or override) it came from."""


# --------------------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = doc("mel", "Run name; with the config hash it determines the run id.")
    seed: int = doc(0, "Master seed: sampling, pairing and replay seeds derive from it and the step.")
    steps: int = doc(4, "Number of MEL training steps in the campaign.")
    root_dir: str = doc("runs", "Directory holding one sub-directory per run (DuckDB file, checkpoints).")
    cache_dir: str = doc(".cache/mel", "Where built artefacts shared across runs live (the tiny warm start).")
    torch_threads: int = doc(0, "torch.set_num_threads for the process; 0 leaves torch's default.")


@dataclass
class TinyModelConfig:
    hidden_size: int = doc(128, "Embedded model width (Qwen2 architecture).")
    num_layers: int = doc(4, "Transformer blocks.")
    num_heads: int = doc(4, "Attention heads.")
    num_kv_heads: int = doc(2, "Key/value heads (grouped-query attention, as Qwen2/3).")
    intermediate_size: int = doc(512, "MLP width.")
    vocab_size: int = doc(512, "Byte-level BPE vocabulary size trained on the synthetic corpus.")
    max_position_embeddings: int = doc(512, "Context window of the tiny model, in tokens.")


@dataclass
class LoraSettings:
    enabled: bool = doc(False, "Train LoRA adapters (peft) instead of the full model; checkpoints are adapters.")
    r: int = doc(16, "LoRA rank.")
    alpha: int = doc(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = doc(0.0, "LoRA dropout.")
    target_modules: List[str] = doc(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    "Modules that get adapters (all attention and MLP projections of Qwen2/3).")


@dataclass
class VLLMSettings:
    kv_cache_gib: float = doc(0.0, "KV cache of the vLLM engine in GiB; 0 = vLLM's default (GPU: 0.9 of the device's "
                              "memory, too much beside a colocated trainer; CPU: VLLM_CPU_KVCACHE_SPACE or what is free).")


@dataclass
class ModelConfig:
    name_or_path: str = doc("tiny", "'tiny' builds the embedded model by warm start; otherwise an HF path or hub name (GPU configs).")
    engine: str = doc("hf", "Generation engine: hf (transformers generate on the training module itself) | vllm (a vLLM "
                      "engine beside it, refreshed from each update's checkpoint; optional dependency, see README 'Scaling').")
    vllm: VLLMSettings = section(VLLMSettings, "Settings of the vLLM engine (model.engine: vllm).")
    dtype: str = doc("float32", "Parameter dtype: float32 | bfloat16.")
    device: str = doc("auto", "Where the policy trains and the HF engine generates: auto (cuda when torch sees a GPU, "
                      "else cpu) | cpu | cuda | cuda:N.")
    gradient_checkpointing: bool = doc(False, "Recompute activations in backward (GPU memory for long contexts).")
    max_seq_len: int = doc(512, "Longest prompt+completion the update sees; longer retrospective contexts are left-truncated in the prompt part.")
    lora: LoraSettings = section(LoraSettings, "LoRA instead of full fine-tuning.")
    tiny: TinyModelConfig = section(TinyModelConfig, "Shape of the embedded tiny model.")


@dataclass
class WarmStartConfig:
    steps: int = doc(700, "Optimizer steps of warm-start training of the tiny model (about 3.5 min on 2 cores).")
    batch_size: int = doc(64, "Sequences per warm-start step.")
    lr: float = doc(2e-3, "Peak learning rate (cosine decay to a tenth, linear warmup); 3e-3 and above learn arithmetic slower.")
    warmup_steps: int = doc(30, "Linear warmup steps.")
    analysis_fraction: float = doc(0.08, "Fraction of warm-start examples that teach the analysis format (parse rate ~1.0 already at 0.08).")
    validation_fraction: float = doc(0.07, "Fraction that teach solving with a heuristic in context (the validation prompt).")
    eval_problems: int = doc(200, "Held-out problems for the greedy accuracy printed after warm start.")
    seed: int = doc(0, "Seed of warm-start data and initialisation.")


@dataclass
class SyntheticConfig:
    min_ops: int = doc(1, "Fewest operators per synthetic problem.")
    max_ops: int = doc(2, "Most operators per synthetic problem.")
    max_number: int = doc(20, "Operands are drawn from 1..max_number (20: the tiny warm start reaches ~30-70% greedy accuracy).")
    operators: str = doc("+-*", "Operators used; '*' binds tighter than '+'/'-'.")
    train_size: int = doc(4096, "Problems in the training split.")
    eval_size: int = doc(200, "Problems in the held-out split.")
    seed: int = doc(1234, "Seed of problem generation (training and held-out splits do not overlap).")


@dataclass
class DataConfig:
    source: str = doc("synthetic", "'synthetic' (embedded task) or a path to a JSONL file of problems.")
    question_field: str = doc("problem", "JSONL field holding the question.")
    answer_field: str = doc("answer", "JSONL field holding the gold answer.")
    id_field: str = doc("", "JSONL field holding a row id; empty means the line number.")
    synthetic: SyntheticConfig = section(SyntheticConfig, "The embedded synthetic arithmetic task.")


@dataclass
class SamplingConfig:
    prompts_per_step: int = doc(128, "Prompts per training step (B).", PAPER)
    group_size: int = doc(8, "Rollouts per prompt (G).", PAPER)
    temperature: float = doc(1.0, "Rollout sampling temperature.", PAPER)
    top_p: float = doc(1.0, "Nucleus sampling; 1.0 disables it (top_k is always 0).")
    max_new_tokens: int = doc(1024, "Longest rollout.")
    chunk_sequences: int = doc(256, "Sequences per generation chunk: every generation (rollouts, analyses, replays) is cut "
                               "into chunks of this many sequences, each one batched generate call seeded with the call's "
                               "seed + chunk index, and the unit `orchestration.runner: ray` sends to a worker. HF engine "
                               "only (vLLM batches on its own). Our choice.")


@dataclass
class ExperienceConfig:
    enabled: bool = doc(True, "Run the MEL stages (pair, diagnose, abstract, replay) and the NLL term; False is plain GRPO.")
    pairing: str = doc("random", "How pairs are drawn from a mixed group: random (k per group, seeded) | all | disjoint (no rollout reused).")
    pairs_per_group: int = doc(1, "k: contrastive (correct, incorrect) pairs drawn per mixed group (random/disjoint), with the step seed.")
    analysis_temperature: float = doc(1.0, "Sampling temperature of the analysis (diagnose/abstract) generation.")
    analysis_max_new_tokens: int = doc(1024, "Longest analysis generation.")
    replays_per_experience: int = doc(1, "Replays of the question with the meta-experience in context.")
    accept_min_correct: int = doc(1, "Replays that must verify for a meta-experience to be accepted (paper: the one replay must).", PAPER)
    replay_temperature: float = doc(1.0, "Sampling temperature of replays.")
    max_heuristics: int = doc(3, "Most heuristics kept from one analysis.")
    analysis_mode: str = doc("single_pass", "single_pass: s*, C and H in one generation (the paper's appendix "
                             "prompt); two_pass: H in a second batched call conditioned on s* and C (Eqs. 2-4; "
                             "needs abstract.txt in the prompt set). Our choice between the paper's two descriptions.")


@dataclass
class LossConfig:
    advantage: str = doc("grpo", "Advantage estimator by name (mel_core.losses.ADVANTAGES).", PAPER)
    policy_loss: str = doc("grpo", "Policy loss / aggregation by name (mel_core.losses.POLICY_LOSSES); grpo = per-sequence token mean, then mean (Eq. 10).", PAPER)
    epsilon: float = doc(0.2, "PPO ratio clip range (the paper does not state it).")
    epsilon_high: Optional[float] = doc(None, "Upper clip for DAPO clip-higher; None uses epsilon.")
    beta: float = doc(0.0, "KL coefficient to the reference policy (k3); 0 as in the paper.", PAPER)
    nll_coef: float = doc(1.0, "lambda in L = L_RL + lambda * L_NLL.", PAPER)


@dataclass
class OptimConfig:
    lr: float = doc(1e-6, "AdamW learning rate.", PAPER)
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    betas: list = doc([0.9, 0.999], "AdamW betas.")
    max_grad_norm: float = doc(1.0, "Gradient clipping norm; 0 disables it.")
    mini_batch_size: int = doc(0, "Sequences per optimizer step; 0 = the whole batch (paper: mini-batch 128 = batch 128, one step).", PAPER)
    epochs_per_step: int = doc(1, "PPO-style passes over the step's batch (ratios against pi_old log-probs); paper: 1.")
    fsdp_processes: int = doc(1, "Processes the update stage trains in (one per GPU), its model sharded with FSDP2 "
                              "(fully_shard) and launched by torchrun (mel_core/distributed.py); 1 = in the flow's "
                              "process. The step is the same either way, to float reduction order.")
    micro_batch_size: int = doc(0, "Sequences per forward/backward (gradient accumulation, aggregation kept exact; sequences are grouped by length, so each computes less padding); 0 = whole mini-batch.")


@dataclass
class VerifyConfig:
    timeout_s: float = doc(5.0, "Time limit per verified item (math-verify runs in a worker process).")
    extraction: str = doc("boxed_last", "Where a math answer is read: boxed_last (the content of the LAST \\boxed{} / "
                          "\\fbox{}, parsed by math-verify; no box = no_answer) | math_verify (math-verify's own "
                          "chain, which falls back to the last number: a text cut off at '40+2=42 and then' scores "
                          "42, and two nearby boxes become a set that matches neither). Our choice: the solve prompt asks "
                          "for the final answer in \\boxed{}, so the last box is the answer the model gave.")
    truncated_reward: str = doc("zero", "Reward of a rollout cut at the length limit (finish_reason 'length'): zero "
                                "(0, reason 'truncated', not verified) | verify (verified like any other). Our choice: "
                                "a cut-off text did not finish its solution, so a box in it is not its final answer, "
                                "and crediting it would reward runaway generations (DAPO's overlong reward shaping "
                                "makes the same call); applies to evaluation alike.")


@dataclass
class PromptsConfig:
    dir: str = doc("configs/prompts/paper", "Directory with solve.txt, analysis.txt, validation.txt (+ abstract.txt, "
                   "optional diagnose.txt for two_pass).")
    chat_template: bool = doc(False, "Wrap every prompt as one user turn of the tokenizer's chat template (instruction-"
                              "tuned models); base models, as in the paper (Qwen3-*-Base), take the raw text.")
    chat_template_kwargs: Dict[str, Any] = doc({}, "Extra arguments of apply_chat_template, e.g. {enable_thinking: false} for Qwen3.")


@dataclass
class EvalConfig:
    datasets: List[str] = doc([], "Datasets to evaluate on: 'synthetic' or JSONL paths (MATH-500, AIME24/25, AMC23, GSM8K).")
    greedy: bool = doc(True, "Greedy Pass@1.", PAPER)
    temperature: float = doc(0.6, "Sampling temperature of Avg@k / Pass@k.", PAPER)
    k: int = doc(8, "Samples per problem for Avg@k / Pass@k (unbiased estimator, Chen et al. 2021); 0 = greedy only.", PAPER)
    every_n_steps: int = doc(0, "Evaluate the campaign every N steps (and the base and final checkpoints); 0 = never during training.")
    max_new_tokens: int = doc(4096, "Longest evaluation generation.")
    max_problems: int = doc(0, "Evaluate the first N problems of each dataset (in file / split order); 0 = all of them.")


@dataclass
class LibraryConfig:
    similarity_threshold: float = doc(0.7, "Cosine of text features (mel_core.library) at which a heuristic joins a cluster: "
                                      "lexical paraphrases score 0.75-1.0, rules sharing only a condition 0.63-0.68. "
                                      "Bookkeeping only: not part of the config hash; a change re-clusters the run.")


@dataclass
class StagePolicy:
    retries: int = doc(2, "Retries of a transiently failed stage (data/config errors and NaN losses fail at once).")
    retry_delay_s: float = doc(2.0, "Delay before the first retry.")
    retry_backoff: float = doc(2.0, "Each further retry waits this factor longer.")
    timeout_s: Optional[float] = doc(None, "Stage time limit (Prefect timeout_seconds); None = no limit.")


@dataclass
class FaultConfig:
    stage: str = doc("update", "Stage to fail (one of the seven, or warm_start).")
    step: int = doc(1, "Step at which it fails.")
    times: int = doc(1, "How many executions of that stage fail before it succeeds.")
    when: str = doc("after", "'before' the stage body runs, or 'after' it has written its records.")
    kind: str = doc("transient", "'transient' (retried) or 'permanent' (fails the run at once).")


@dataclass
class RaySettings:
    address: str = doc("", "Ray cluster to join: '' starts a local one for the campaign's process (local_workers CPUs); "
                       "'auto' joins the cluster of this machine (`ray start --head`); 'ray://HOST:10001' a remote "
                       "head through Ray Client. Checkpoints must then be on storage every node reads.")
    local_workers: int = doc(2, "CPUs (= concurrent chunk tasks) of the local cluster started when address is ''.")
    cpus_per_chunk: float = doc(1.0, "Ray resources one generation chunk task asks for: CPUs.")
    gpus_per_chunk: float = doc(0.0, "Ray resources one generation chunk task asks for: GPUs (1 on a GPU cluster: "
                                "each worker keeps one policy copy on its GPU).")
    threads_per_worker: int = doc(0, "torch.set_num_threads in each Ray worker; 0 = run.torch_threads.")


@dataclass
class OrchestrationConfig:
    runner: str = doc("local", "Where generation runs: local (the flow's process, its own engine) | ray (sample, "
                      "diagnose/abstract, replay and evaluation fan their chunks out as Prefect tasks on "
                      "prefect-ray's task runner; workers keep their own HF engine; only the flow process writes "
                      "DuckDB). Needs the `scale` extra (pip install -e '.[scale]').")
    ray: RaySettings = section(RaySettings, "The Ray cluster of orchestration.runner: ray.")
    default: StagePolicy = section(StagePolicy, "Retry/timeout policy of every stage.")
    stages: Dict[str, StagePolicy] = doc({}, "Per-stage overrides of the default policy, keyed by stage name.")
    faults: List[FaultConfig] = doc([], "Fault injection for tests and drills: fail a stage at a step.")


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


# ----------------------------------------------------------------------------------------- loading


def _wrap(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    msg = str(err).splitlines()[0]
    return ConfigError(f"{origin}: bad config key '{key}': {msg}")


def _read_yaml_chain(path: Path, seen: tuple = ()) -> list[tuple[str, Any]]:
    """[(origin, DictConfig)] from the root of the `extends:` chain down to `path`."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from e
    if node is None:
        node = OmegaConf.create({})
    chain: list[tuple[str, Any]] = []
    parent = node.pop("extends", None) if hasattr(node, "pop") else None
    if parent is not None:
        chain += _read_yaml_chain((path.parent / str(parent)), seen + (path,))
    chain.append((str(path), node))
    return chain


def load(path: str | Path | None = None, overrides: list[str] | tuple = (), base: dict | None = None) -> MelConfig:
    """Validated config: schema defaults <- `base` (a `to_dict` output, e.g. a run's stored config) <- YAML
    chain <- `key=value` overrides."""
    cfg = OmegaConf.structured(MelConfig)
    if base is not None:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(base))
        except OmegaConfBaseException as e:
            raise _wrap(e, "base config") from e
    if path is not None:
        for origin, node in _read_yaml_chain(Path(path)):
            try:
                cfg = OmegaConf.merge(cfg, node)
            except OmegaConfBaseException as e:
                raise _wrap(e, origin) from e
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}': expected key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override '{ov}'") from e
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def from_dict(d: dict) -> MelConfig:
    """Rebuild a validated config from `to_dict` output (what flows receive as a parameter)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(MelConfig), OmegaConf.create(d))
    except OmegaConfBaseException as e:
        raise _wrap(e, "flow parameter 'config'") from e
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def to_dict(cfg: MelConfig) -> dict:
    return dataclasses.asdict(cfg)


# What does not change a campaign's results, and so stays out of its identity (run id, cache keys):
# its length (extending a campaign keeps it), where it lives on disk, threads, the heuristic library's
# clustering (bookkeeping over the results, rebuilt when it changes), evaluation (keyed on its own, see
# mel_core.evaluate.eval_config_hash), orchestration (retries, timeouts, injected faults) and the generation
# engine: HF and vLLM sample the same distributions with other random streams and kernels, as other threads
# reduce in another order, so a campaign can be resumed on the other engine.
RESULT_NEUTRAL_KEYS = ("run.steps", "run.root_dir", "run.cache_dir", "run.torch_threads", "library", "eval",
                       "orchestration", "model.engine", "model.vllm", "model.device",
                       "optim.fsdp_processes")


def config_hash(cfg: MelConfig, exclude: tuple[str, ...] = RESULT_NEUTRAL_KEYS) -> str:
    """Stable hash of everything that changes results (all but RESULT_NEUTRAL_KEYS)."""
    d = to_dict(cfg)
    for dotted in exclude:
        *parents, leaf = dotted.split(".")
        node = d
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def validate(cfg: MelConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    from mel_core import losses  # local: losses imports torch

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}': {msg}")

    need(cfg.sampling.group_size >= 2, "sampling.group_size", "GRPO needs at least 2 rollouts per prompt")
    need(cfg.sampling.prompts_per_step >= 1, "sampling.prompts_per_step", "must be >= 1")
    need(cfg.optim.fsdp_processes >= 1, "optim.fsdp_processes", "must be >= 1")
    need(cfg.optim.fsdp_processes == 1 or not cfg.model.lora.enabled, "optim.fsdp_processes",
         "LoRA updates train in one process (only the adapters train): set it to 1")
    need(cfg.sampling.chunk_sequences >= 1, "sampling.chunk_sequences", "must be >= 1")
    need(cfg.orchestration.runner in ("local", "ray"), "orchestration.runner", "local or ray")
    need(cfg.orchestration.runner == "local" or cfg.model.engine == "hf", "orchestration.runner",
         "ray workers run the HF engine: use model.engine: hf with it (vLLM workers are not built yet)")
    need(cfg.orchestration.ray.local_workers >= 1, "orchestration.ray.local_workers", "must be >= 1")
    need(cfg.loss.advantage in losses.ADVANTAGES, "loss.advantage", f"unknown estimator; one of {sorted(losses.ADVANTAGES)}")
    need(cfg.loss.policy_loss in losses.POLICY_LOSSES, "loss.policy_loss", f"unknown loss; one of {sorted(losses.POLICY_LOSSES)}")
    need(1 <= cfg.experience.accept_min_correct <= cfg.experience.replays_per_experience,
         "experience.accept_min_correct", "must be between 1 and experience.replays_per_experience")
    need(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "float32 or bfloat16")
    need(cfg.model.engine in ("hf", "vllm"), "model.engine", "hf or vllm")
    need(cfg.model.device in ("auto", "cpu", "cuda") or cfg.model.device.startswith("cuda:"), "model.device",
         "auto, cpu, cuda or cuda:N")
    need(cfg.model.vllm.kv_cache_gib >= 0, "model.vllm.kv_cache_gib", "must be >= 0")
    need(cfg.experience.pairing in ("random", "all", "disjoint"), "experience.pairing", "random, all or disjoint")
    need(cfg.experience.analysis_mode in ("single_pass", "two_pass"), "experience.analysis_mode",
         "single_pass or two_pass")
    if cfg.experience.enabled and cfg.experience.analysis_mode == "two_pass":
        from mel_core.prompts import PromptSet, resolve_path
        need(PromptSet.load(cfg.prompts.dir).abstract is not None, "experience.analysis_mode",
             f"two_pass needs {resolve_path(cfg.prompts.dir) / 'abstract.txt'}")
    from mel_core.verify import EXTRACTIONS, TRUNCATED_REWARDS  # standard library only at import time
    need(cfg.verify.extraction in EXTRACTIONS, "verify.extraction", f"one of {list(EXTRACTIONS)}")
    need(cfg.verify.truncated_reward in TRUNCATED_REWARDS, "verify.truncated_reward",
         f"one of {list(TRUNCATED_REWARDS)}")
    need(cfg.verify.timeout_s > 0, "verify.timeout_s", "must be > 0")
    need(0 < cfg.library.similarity_threshold <= 1, "library.similarity_threshold", "must be in (0, 1]")
    need(cfg.data.synthetic.min_ops <= cfg.data.synthetic.max_ops, "data.synthetic.min_ops", "must be <= max_ops")
    need(cfg.eval.k >= 0 and cfg.eval.max_problems >= 0, "eval.k", "eval.k and eval.max_problems must be >= 0")
    need(cfg.eval.greedy or cfg.eval.k > 0, "eval.greedy", "with eval.k = 0, greedy must be on (nothing to evaluate)")
    need(cfg.eval.every_n_steps <= 0 or bool(cfg.eval.datasets), "eval.datasets",
         "eval.every_n_steps > 0 needs at least one dataset ('synthetic' or a JSONL path)")
    from mel_core.stages import ALL_STAGES
    for name in cfg.orchestration.stages:
        need(name in ALL_STAGES, f"orchestration.stages.{name}", f"unknown stage; one of {list(ALL_STAGES)}")
    for i, f in enumerate(cfg.orchestration.faults):
        need(f.stage in ALL_STAGES, f"orchestration.faults[{i}].stage", f"unknown stage; one of {list(ALL_STAGES)}")
        need(f.when in ("before", "after"), f"orchestration.faults[{i}].when", "'before' or 'after'")
        need(f.kind in ("transient", "permanent"), f"orchestration.faults[{i}].kind", "'transient' or 'permanent'")


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
