"""Rendering of the prompts MEL uses: solve (rollouts), analysis (diagnose/abstract), validation (replay).

Templates live in a directory (``configs/prompts/<set>/``) as ``solve.txt``, ``analysis.txt`` and
``validation.txt`` with ``str.format`` fields. The analysis prompt shows the *incorrect* solution
first and the correct one second, as the paper's appendix does; the NLL target is the policy's own
analysis given exactly this prompt (the retrospective context).

``experience.analysis_mode: two_pass`` also needs ``abstract.txt`` (fields ``{question}``,
``{incorrect}``, ``{correct}``, ``{diagnosis}``): the second call that writes the heuristics H
conditioned on s* and C. An optional ``diagnose.txt`` (same fields as the analysis prompt) replaces the
analysis prompt in the first call of that mode, e.g. to ask for the diagnosis sections only.

Rendering gives plain text. Instruction-tuned models expect it inside their chat template:
:meth:`PromptSet.to_model_input` wraps a rendered prompt as one user turn (plus the generation prompt)
when asked to and the tokenizer has a template; base models (e.g. Qwen3-4B-Base, the tiny model) are
prompted with the raw text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mel_core.config import resolve_path

FIELDS = {
    "solve": ("question",),
    "analysis": ("question", "incorrect", "correct"),
    "validation": ("experience", "question"),
}
# Templates only the two_pass analysis mode reads; a prompt set may leave them out.
OPTIONAL_FIELDS = {
    "diagnose": ("question", "incorrect", "correct"),
    "abstract": ("question", "incorrect", "correct", "diagnosis"),
}


@dataclass(frozen=True)
class PromptSet:
    solve: str
    analysis: str
    validation: str
    diagnose: str | None = None
    abstract: str | None = None

    @classmethod
    def load(cls, directory: str | Path) -> "PromptSet":
        d = resolve_path(directory)
        texts = {}
        for name, fields in {**FIELDS, **OPTIONAL_FIELDS}.items():
            f = d / f"{name}.txt"
            if not f.exists():
                if name in OPTIONAL_FIELDS:
                    continue
                raise FileNotFoundError(f"prompt template missing: {f}")
            text = f.read_text()
            for fld in fields:
                if "{" + fld + "}" not in text:
                    raise ValueError(f"{f}: template lacks the field {{{fld}}}")
            texts[name] = text
        return cls(**texts)

    def core(self) -> dict[str, str]:
        """The three templates every mode uses (what the tiny model's warm start is trained on)."""
        return {name: getattr(self, name) for name in FIELDS}

    def render_solve(self, question: str) -> str:
        return self.solve.format(question=question)

    def render_analysis(self, question: str, incorrect: str, correct: str) -> str:
        return self.analysis.format(question=question, incorrect=incorrect.strip(), correct=correct.strip())

    def render_validation(self, question: str, experience: str) -> str:
        return self.validation.format(question=question, experience=experience.strip())

    def render_diagnose(self, question: str, incorrect: str, correct: str) -> str:
        """The first call of two_pass: ``diagnose.txt`` if the set has one, else the analysis prompt."""
        template = self.diagnose or self.analysis
        return template.format(question=question, incorrect=incorrect.strip(), correct=correct.strip())

    def render_abstract(self, question: str, incorrect: str, correct: str, diagnosis: str) -> str:
        """The second call of two_pass: heuristics H conditioned on the diagnosis (s*, C)."""
        if self.abstract is None:
            raise ValueError("this prompt set has no abstract.txt, which analysis_mode two_pass needs")
        return self.abstract.format(question=question, incorrect=incorrect.strip(), correct=correct.strip(),
                                    diagnosis=diagnosis.strip())

    @staticmethod
    def to_model_input(text: str, tokenizer: Any = None, use_chat_template: bool = False,
                       **template_kwargs: Any) -> str:
        """The string to feed the model for a rendered prompt.

        With `use_chat_template` and a tokenizer that has a ``chat_template``, the text becomes a single
        user turn: ``tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
        add_generation_prompt=True, **template_kwargs)`` (e.g. ``enable_thinking=False`` for Qwen3).
        Otherwise the text is returned unchanged.
        """
        if not use_chat_template or tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return text
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, **template_kwargs)
