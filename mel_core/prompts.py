"""Rendering of the three prompts MEL uses: solve (rollouts), analysis (diagnose/abstract), validation (replay).

Templates live in a directory (``configs/prompts/<set>/``) as ``solve.txt``, ``analysis.txt`` and
``validation.txt`` with ``str.format`` fields. The analysis prompt shows the *incorrect* solution
first and the correct one second, as the paper's appendix does; the NLL target is the policy's own
analysis given exactly this prompt (the retrospective context).

Rendering gives plain text. Instruction-tuned models expect it inside their chat template:
:meth:`PromptSet.to_model_input` wraps a rendered prompt as one user turn (plus the generation prompt)
when asked to and the tokenizer has a template; base models (e.g. Qwen3-4B-Base, the tiny model) are
prompted with the raw text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

FIELDS = {
    "solve": ("question",),
    "analysis": ("question", "incorrect", "correct"),
    "validation": ("experience", "question"),
}


def resolve_path(p: str | Path) -> Path:
    """Paths in configs are relative to the working directory, else to the repository root."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


@dataclass(frozen=True)
class PromptSet:
    solve: str
    analysis: str
    validation: str

    @classmethod
    def load(cls, directory: str | Path) -> "PromptSet":
        d = resolve_path(directory)
        texts = {}
        for name, fields in FIELDS.items():
            f = d / f"{name}.txt"
            if not f.exists():
                raise FileNotFoundError(f"prompt template missing: {f}")
            text = f.read_text()
            for fld in fields:
                if "{" + fld + "}" not in text:
                    raise ValueError(f"{f}: template lacks the field {{{fld}}}")
            texts[name] = text
        return cls(**texts)

    def render_solve(self, question: str) -> str:
        return self.solve.format(question=question)

    def render_analysis(self, question: str, incorrect: str, correct: str) -> str:
        return self.analysis.format(question=question, incorrect=incorrect.strip(), correct=correct.strip())

    def render_validation(self, question: str, experience: str) -> str:
        return self.validation.format(question=question, experience=experience.strip())

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
