"""The pipeline's verifier: a reward kind with its settings, its identity (what decides its verdicts), and batch verification."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from mel_core.algorithm.rewards.math_answers import check_choice, verify_math_batch
from mel_core.algorithm.rewards.pool import check_timeout
from mel_core.algorithm.rewards.synthetic import verify_synthetic
from mel_core.algorithm.rewards.verdicts import (
    DEFAULT_EXTRACTION,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TRUNCATED_REWARD,
    LENGTH,
    TRUNCATED,
    VERIFIER_VERSION,
    Verdict,
)
from mel_core.vocabulary import EXTRACTIONS, REWARD_KINDS, TRUNCATED_REWARDS

# ------------------------------------------------------------------------------------------- the pipeline's verifier

def reward_kind_for_source(source: str) -> str:
    """``"synthetic"`` for the embedded task (``data.source: synthetic``), ``"math"`` for any dataset file."""
    return "synthetic" if str(source).strip().lower() == "synthetic" else "math"


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# The packages whose behaviour decides a math verdict (math-verify's parser/grader and the sympy it runs on).
_MATH_PACKAGES = ("math-verify", "latex2sympy2_extended", "sympy")


@dataclass(frozen=True)
class Verifier:
    """What the pipeline calls to score completions: one reward kind with its settings.

    ``kind`` is ``"synthetic"`` (last ``Answer:`` line, exact integer, inline) or ``"math"`` (math-verify in the
    worker pool, with ``extraction`` and ``timeout_s``); ``truncated_reward`` applies to both. Build it with
    :meth:`from_config`; :attr:`identity` / :attr:`identity_hash` say what produced a verdict (provenance).
    """

    kind: str
    extraction: str = DEFAULT_EXTRACTION
    truncated_reward: str = DEFAULT_TRUNCATED_REWARD
    timeout_s: float | None = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        check_choice("reward kind", self.kind, REWARD_KINDS)
        check_choice("extraction", self.extraction, EXTRACTIONS)
        check_choice("truncated_reward", self.truncated_reward, TRUNCATED_REWARDS)
        object.__setattr__(self, "timeout_s", check_timeout(self.timeout_s))

    @classmethod
    def from_config(cls, verify_cfg: Any, reward_kind: str) -> Verifier:
        """From a ``VerifyConfig`` (``mel_core.config``; any object with its fields) and the data's reward kind."""
        return cls(kind=reward_kind, extraction=verify_cfg.extraction, truncated_reward=verify_cfg.truncated_reward,
                   timeout_s=verify_cfg.timeout_s)

    @property
    def identity(self) -> dict:
        """Everything that decides this verifier's verdicts, as a JSON-able dict: the logic's version, the kind and
        its settings, and for math the installed versions of math-verify and the packages it parses with. Settings
        a kind does not use are None (the synthetic task has no extraction choice, no pool and no time limit)."""
        math = self.kind == "math"
        return {
            "version": VERIFIER_VERSION,
            "kind": self.kind,
            "extraction": self.extraction if math else "last_answer_line",
            "truncated_reward": self.truncated_reward,
            "timeout_s": self.timeout_s if math else None,
            "packages": {p: _installed_version(p) for p in _MATH_PACKAGES} if math else {},
        }

    @property
    def identity_hash(self) -> str:
        """A short stable hash of :attr:`identity` (16 hex digits of its sorted-key JSON's SHA-256)."""
        blob = json.dumps(self.identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def verify(self, texts: Sequence[str], golds: Sequence[Any],
               finish_reasons: Sequence[str | None] | None = None) -> list[Verdict]:
        """One verdict per text, in order; never raises on model output.

        ``finish_reasons`` are the engine's (``"stop"`` | ``"length"``) per text; None means every text finished.
        With ``truncated_reward: zero`` a ``"length"`` text scores 0 with reason ``"truncated"`` and is not
        verified; otherwise it is verified like any other.
        """
        texts, golds = list(texts), list(golds)
        if len(texts) != len(golds):
            raise ValueError(f"{len(texts)} texts but {len(golds)} golds")
        if finish_reasons is not None:
            finish_reasons = list(finish_reasons)
            if len(finish_reasons) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(finish_reasons)} finish_reasons")
        truncated = [self.truncated_reward == "zero" and finish_reasons is not None and finish_reasons[i] == LENGTH
                     for i in range(len(texts))]
        keep = [i for i, t in enumerate(truncated) if not t]
        verified = self._verify_finished([texts[i] for i in keep], [golds[i] for i in keep])
        verdicts = [Verdict(0.0, None, TRUNCATED)] * len(texts)
        for i, v in zip(keep, verified):
            verdicts[i] = v
        return verdicts

    def _verify_finished(self, texts: list, golds: list) -> list[Verdict]:
        if self.kind == "synthetic":
            return [verify_synthetic(t, g) for t, g in zip(texts, golds)]
        return verify_math_batch(texts, golds, self.timeout_s, extraction=self.extraction)


def verify_batch(kind: str, texts: Sequence[str], golds: Sequence[Any], timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 *, extraction: str = DEFAULT_EXTRACTION, truncated_reward: str = DEFAULT_TRUNCATED_REWARD,
                 finish_reasons: Sequence[str | None] | None = None) -> list[Verdict]:
    """:meth:`Verifier.verify` in one call: ``kind`` "synthetic" (inline, no pool) or "math" (worker pool)."""
    return Verifier(kind, extraction, truncated_reward, timeout_s).verify(texts, golds, finish_reasons)


