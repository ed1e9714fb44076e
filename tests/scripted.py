"""Constructed situations: an engine whose words the test chooses, for the synthetic task's tiny prompt set.

A test about what the pipeline does *with* a situation (no mixed group, nothing parsed, nothing accepted,
a truncated analysis, ...) must not hope that the warm-started tiny model happens to produce it: its warm
start differs slightly across machines. :class:`ScriptedEngine` implements the engine interface
(``mel_core.model.engines.base.Engine``) and answers each prompt with the text a :class:`Script` chooses, encoded by
the policy's real tokenizer (with eos when it fits, cut at ``max_new_tokens`` as a real engine would). The
policy still loads, trains and saves for real; only what it "says" is decided by the test.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from mel_core.model.engines.base import Completion, SamplingParams
from mel_core.problems.worlds import arithmetic
from mel_core.run import executions

RIGHT_RULE = "If a step uses an earlier result, then copy that result exactly."


def solution(question: str, correct: bool = True) -> str:
    """The synthetic task's step-by-step solution; a wrong one ends with an answer off by one."""
    lines = arithmetic.solution_lines(question)
    if not correct:
        value = int(lines[-1].removeprefix(arithmetic.ANSWER_PREFIX))
        lines[-1] = f"{arithmetic.ANSWER_PREFIX}{value + 1}"
    return arithmetic.format_solution(lines)


def typed_error(question: str) -> str:
    """An incorrect solution with one error of an arithmetic error type (the first that applies), else off by one."""
    import random

    for error_type in arithmetic.ERROR_TYPES:
        injected = arithmetic.inject_error(question, error_type, random.Random(0))
        if injected:
            return arithmetic.format_solution(injected[0])
    return solution(question, correct=False)


def compact_analysis(question: str) -> str:
    """A well-formed analysis in the tiny prompt set's compact layout (it parses)."""
    right = arithmetic.solution_lines(question)
    wrong = solution(question, correct=False).splitlines()
    k = arithmetic.first_difference(wrong, right)
    return f"Bifurcation: step {k}\nCritique: {wrong[k - 1]} should be {right[k - 1]}.\nHeuristic: {RIGHT_RULE}"


@dataclass
class Script:
    """What the "model" writes, by the kind of prompt (tiny prompt set: solve ``Q: …``, analysis ``…Analysis:``,
    validation ``Hint: …``).

    solved(question, sample_index): whether that rollout is right. analysis(question) -> the analysis text.
    replay_solves(question): whether a replay with the meta-experience in context is right.
    abstract(question): what the second call of analysis_mode two_pass writes (the heuristics).
    rollout(question, sample_index) / replay(question): the whole text of a solution / a replay, instead of the
    synthetic task's solution that solved / replay_solves choose (a math dataset's boxed answers, say).
    """
    solved: Callable[[str, int], bool] = lambda q, i: i % 2 == 0
    wrong: Callable[[str], str] = lambda q: solution(q, correct=False)  # an incorrect rollout's text
    analysis: Callable[[str], str] = compact_analysis
    replay_solves: Callable[[str], bool] = lambda q: True
    abstract: Callable[[str], str] = lambda q: f"Heuristic: {RIGHT_RULE}"
    rollout: Callable[[str, int], str] | None = None
    replay: Callable[[str], str] | None = None
    seen: list[str] = field(default_factory=list)  # every prompt generated for, in order
    batches: list[list[int]] = field(default_factory=list)  # prompts per request of each generate_many call

    def write(self, prompt: str, index: int) -> str:
        """The tiny prompt set (``Q: …``) or the paper's (``### Problem`` / ``Problem:`` headers)."""
        self.seen.append(prompt)
        found = (re.search(r"^Q: (.*)$", prompt, re.MULTILINE)
                 or re.search(r"^(?:### Problem|Problem:)\n(.*)$", prompt, re.MULTILINE))
        question = found.group(1).strip()
        if prompt.rstrip().endswith("Analysis:") or "Write your analysis" in prompt:
            return self.analysis(question)
        if "\nWrong:\n" in prompt or "### Diagnosis" in prompt:  # two_pass's second call: H is asked for
            return self.abstract(question)
        if prompt.startswith("Hint:") or "Meta-experience (reference information)" in prompt:
            return self.replay(question) if self.replay else solution(question, self.replay_solves(question))
        if self.rollout:
            return self.rollout(question, index)
        return solution(question) if self.solved(question, index) else self.wrong(question)


class ScriptedEngine:
    """An engine that writes what `script` says, tokenized by the policy's tokenizer (or `tokenizer()`, a
    callable, when the engine is made before the policy is loaded)."""

    reads_checkpoints = False  # it writes what the script says: a checkpoint may be saved in the background

    def __init__(self, tokenizer, script: Script):
        self._tokenizer, self.script = tokenizer, script
        self.version: str | None = None
        self.calls: list[tuple[int, SamplingParams]] = []  # (prompts, params) of each generate call

    @property
    def tokenizer(self):
        return self._tokenizer() if callable(self._tokenizer) and not hasattr(self._tokenizer, "encode") \
            else self._tokenizer

    def load_version(self, version: str, path: str) -> None:
        self.version = version

    def generate(self, prompts: Sequence[str], params: SamplingParams, desc: str = "") -> list[list[Completion]]:
        self.calls.append((len(prompts), params))
        return [[self._completion(self.script.write(p, i), params.max_new_tokens) for i in range(params.n)]
                for p in prompts]

    def generate_many(self, requests, desc: str = "") -> list[list[list[Completion]]]:
        """Several requests in one batch (orchestration.overlap), each written as `generate` writes it."""
        self.script.batches.append([len(prompts) for prompts, _ in requests])
        return [[[self._completion(self.script.write(p, i), params.max_new_tokens) for i in range(params.n)]
                 for p in prompts] for prompts, params in requests]

    def _completion(self, text: str, max_new_tokens: int) -> Completion:
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) > max_new_tokens:  # the length limit cuts it, as a real engine would
            ids = ids[:max_new_tokens]
            return Completion(tok.decode(ids, skip_special_tokens=True), ids, "length")
        return Completion(text, ids, "stop")


def scripted_runtime(cfg, script: Script):
    """A runtime for `cfg` whose generations follow `script`, registered with the checkpoint it starts from (its
    base, or for a fork its parent's checkpoint)."""
    from mel_core.step.runtime import Runtime

    rt = Runtime(cfg)
    base = rt.start_checkpoint
    rt.ensure_version(base)
    rt.use_engine(ScriptedEngine(rt.policy.tokenizer, script))
    rt.ensure_version(base)
    executions.register_run(rt, base)
    return rt, base


def run_step(rt, step: int, ckpt, experience_stages: bool = True) -> dict:
    """One step through the stage functions (no orchestrator); returns update's manifest."""
    from mel_core.step import stages

    stages.sample(rt, step, ckpt)
    stages.verify(rt, step)
    if experience_stages:
        stages.pair(rt, step)
        stages.diagnose(rt, step, ckpt)
        stages.abstract(rt, step, ckpt)
        stages.replay(rt, step, ckpt)
    out = stages.update(rt, step, ckpt)
    rt.settle_saves()  # a step is done when its checkpoint and rows are (run.async_save writes them in the background)
    return out


@contextlib.contextmanager
def scripted_runtimes(script: Script | None = None):
    """Every runtime built inside the block (by flows, tasks, `mel` in this process) generates per `script`."""
    from mel_core.step import runtime

    original = runtime.Runtime.__init__
    script = script or Script()

    def init(self, cfg):
        original(self, cfg)
        self.use_engine(ScriptedEngine(lambda: self.policy.tokenizer, script))

    runtime.clear_runtimes()
    runtime.Runtime.__init__ = init
    try:
        yield script
    finally:
        runtime.Runtime.__init__ = original
        runtime.clear_runtimes()
