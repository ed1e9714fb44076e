"""Who writes the meta-experience (``experience.analyst``): the same prompts, parser, filter and NLL for all.

- ``policy`` [P]: the policy itself, the paper's method (the runtime's engine).
- ``model:<path>``: a fixed teacher model (an HF checkpoint, never trained) writes the analyses — an option for
  users who have a stronger model; the policy still learns M* given C_retro.
- ``oracle``: the embedded world, which knows its error types, writes the correct analysis of each real
  incorrect rollout (``World.oracle_analysis``) — it uses world knowledge and is labelled so: a calibration arm
  (does a correct lesson reach the solver?), not a method.
- ``mismatched``: the oracle's analysis with its lesson swapped for another error type's lesson of the nearest
  length — the extra-gradient control (as much NLL, on a lesson that does not fit); with
  ``experience.mismatch_pool: weak_rules`` only another weak rule's (loss-matched on the new-lesson warm start).

Each returns one :class:`~mel_core.model.engines.base.Completion` per prompt, in order; scripted texts are encoded by
the policy's tokenizer and end with eos, so they are parsed, replayed and trained exactly as generations are.
"""

from __future__ import annotations

from typing import Sequence

from mel_core.algorithm import meta_experience
from mel_core.model.engines.base import Completion, SamplingParams
from mel_core.problems import worlds
from mel_core.tokens import encode_completions

UNKNOWN_ERROR = "(the world knows no error type for this attempt)"  # parses as nothing: rejected like a failed one


def kind(analyst: str) -> str:
    return "model" if analyst.startswith("model:") else analyst


def write(rt, stage: str, pairs: Sequence[dict], prompts: Sequence[str], params: SamplingParams,
          desc: str = "") -> list[Completion]:
    """One analysis per prompt (`stage` diagnose, or abstract in two_pass) by the configured analyst; `pairs`
    carry each prompt's question and both solutions (for the world's analysts)."""
    analyst = rt.cfg.experience.analyst
    if analyst == "policy":
        return [c for (c,) in rt.engine.generate(list(prompts), params, desc=desc)]
    if kind(analyst) == "model":
        return [c for (c,) in rt.analyst_engine.generate(list(prompts), params, desc=desc)]
    world = worlds.get(rt.cfg.data.synthetic.world)
    texts = [world.oracle_analysis(p["question"], p["incorrect"].splitlines()) for p in pairs]
    if analyst == "mismatched":
        pool = mismatch_pool(rt.cfg, world)
        texts = [mismatch(t, pool) if t else t for t in texts]
    texts = [_part(t, stage, rt.cfg.experience.analysis_mode) if t else UNKNOWN_ERROR for t in texts]
    return [_completion(rt.policy.tokenizer, t) for t in texts]


def mismatch_pool(cfg, world) -> dict[str, str]:
    """The lessons a mismatched analysis may take (experience.mismatch_pool): every error type's, or the weak
    rules' only (then a lesson is swapped for one the new-lesson warm start never trained either)."""
    if cfg.experience.mismatch_pool == "weak_rules":
        weak = set(cfg.data.synthetic.rules.weak_rules)
        return {k: v for k, v in world.error_types.items() if k in weak}
    return dict(world.error_types)


def mismatch(analysis: str, lessons: dict[str, str]) -> str:
    """`analysis` with each of its lessons replaced by another error type's lesson, the one nearest in length."""
    out = []
    for line in analysis.splitlines():
        if line.startswith("Heuristic: "):
            lesson = line.removeprefix("Heuristic: ")
            others = [x for x in lessons.values() if x != lesson]
            line = "Heuristic: " + min(others, key=lambda x: (abs(len(x) - len(lesson)), x))
        out.append(line)
    return "\n".join(out)


def _part(text: str, stage: str, mode: str) -> str:
    """In two_pass, the first call writes the diagnosis and the second the heuristics."""
    if mode != "two_pass":
        return text
    diagnosis = meta_experience.diagnosis_part(text)
    return diagnosis if stage == "diagnose" else text[len(diagnosis):].strip()


def _completion(tokenizer, text: str) -> Completion:
    return Completion(text, encode_completions(tokenizer, [text])[0] + [tokenizer.eos_token_id], "stop")
