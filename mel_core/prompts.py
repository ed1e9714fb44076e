"""Rendering of the three prompts MEL uses: solve (rollouts), analysis (diagnose/abstract), validation (replay).

Templates live in a directory (``configs/prompts/<set>/``) as ``solve.txt``, ``analysis.txt`` and
``validation.txt`` with ``str.format`` fields. The analysis prompt shows the *incorrect* solution
first and the correct one second, as the paper's appendix does; the NLL target is the policy's own
analysis given exactly this prompt (the retrospective context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
