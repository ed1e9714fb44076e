"""The pipeline's verifier: a reward with its settings, its identity (what decides its verdicts), and batch verification.

The rewards are registered by name (:data:`REWARDS`): ``synthetic`` (the embedded worlds' ``Answer:`` line, inline),
``math`` (math-verify in the worker pool) and ``plugin`` (``verify.reward: module:function``, in the worker pool:
mel_core.algorithm.rewards.plugins).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mel_core.algorithm.rewards.math_answers import check_choice, verify_math_batch
from mel_core.algorithm.rewards.plugins import Plugin, problem_record, resolve
from mel_core.algorithm.rewards.pool import check_timeout, shared_pool
from mel_core.algorithm.rewards.synthetic import verify_synthetic
from mel_core.algorithm.rewards.verdicts import (
    DEFAULT_EXTRACTION,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TRUNCATED_REWARD,
    LENGTH,
    TIMEOUT,
    TRUNCATED,
    VERIFIER_VERSION,
    Verdict,
)
from mel_core.vocabulary import EXTRACTIONS, TRUNCATED_REWARDS

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


def _synthetic_batch(v: Verifier, texts: list, golds: list, problems: list) -> list[Verdict]:
    return [verify_synthetic(t, g) for t, g in zip(texts, golds)]


def _math_batch(v: Verifier, texts: list, golds: list, problems: list) -> list[Verdict]:
    return verify_math_batch(texts, golds, v.timeout_s, extraction=v.extraction)


def _plugin_batch(v: Verifier, texts: list, golds: list, problems: list) -> list[Verdict]:
    """The plug-in on every item in the worker pool, each with its deadline: a timeout or an exception in the
    plug-in scores 0 with its reason, as math-verify's do."""
    p = v.plugin
    tasks = [("plugin", (p.module, p.function, p.search_dir, "" if t is None else str(t),
                         problem_record(problem, g)))
             for t, g, problem in zip(texts, golds, problems)]
    verdicts = []
    for status, payload in shared_pool().run(tasks, v.timeout_s):
        if status == "ok":
            verdicts.append(Verdict(float(payload[0]), payload[1], payload[2]))
        else:
            verdicts.append(Verdict(0.0, None, TIMEOUT if status == "timeout" else str(payload)))
    return verdicts


# The registered rewards: name -> (verifier, texts, golds, problems) -> verdicts. verify.reward names one of the
# built-ins (or auto: by the data) or a plug-in.
REWARDS: dict[str, Callable[..., list[Verdict]]] = {"synthetic": _synthetic_batch, "math": _math_batch,
                                                    "plugin": _plugin_batch}
BUILTIN_REWARDS = ("synthetic", "math")


@dataclass(frozen=True)
class Verifier:
    """What the pipeline calls to score completions: one registered reward with its settings.

    ``kind`` is ``"synthetic"`` (last ``Answer:`` line, exact integer, inline), ``"math"`` (math-verify in the
    worker pool, with ``extraction`` and ``timeout_s``) or ``"plugin"`` (``plugin``, a ``module:function``, in the
    worker pool with ``timeout_s``); ``truncated_reward`` applies to all. Build it with :meth:`from_config`;
    :attr:`identity` / :attr:`identity_hash` say what produced a verdict (provenance).
    """

    kind: str
    extraction: str = DEFAULT_EXTRACTION
    truncated_reward: str = DEFAULT_TRUNCATED_REWARD
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    plugin: Plugin | None = None

    def __post_init__(self) -> None:
        check_choice("reward kind", self.kind, tuple(REWARDS))
        check_choice("extraction", self.extraction, EXTRACTIONS)
        check_choice("truncated_reward", self.truncated_reward, TRUNCATED_REWARDS)
        object.__setattr__(self, "timeout_s", check_timeout(self.timeout_s))
        if (self.kind == "plugin") != (self.plugin is not None):
            raise ValueError("a plugin verifier names its plug-in, and only it does")

    @classmethod
    def from_config(cls, verify_cfg: Any, reward_kind: str) -> Verifier:
        """From a ``VerifyConfig`` (``mel_core.config``; any object with its fields) and the data's reward kind:
        ``verify.reward`` auto takes the data's kind, a built-in name that reward, module:function the plug-in
        (resolved here: ConfigError naming verify.reward when it cannot be)."""
        reward = str(getattr(verify_cfg, "reward", "auto")).strip()
        plugin = None
        if reward == "auto":
            kind = reward_kind
        elif reward in BUILTIN_REWARDS:
            kind = reward
        else:
            kind, plugin = "plugin", resolve(reward)
        return cls(kind=kind, extraction=verify_cfg.extraction, truncated_reward=verify_cfg.truncated_reward,
                   timeout_s=verify_cfg.timeout_s, plugin=plugin)

    @property
    def identity(self) -> dict:
        """Everything that decides this verifier's verdicts, as a JSON-able dict: the logic's version, the kind and
        its settings, for math the installed versions of math-verify and the packages it parses with, for a
        plug-in its module:function and its source file's SHA-256. Settings a kind does not use are None (the
        synthetic task has no extraction choice, no pool and no time limit; a plug-in has no extraction)."""
        math = self.kind == "math"
        identity = {
            "version": VERIFIER_VERSION,
            "kind": self.kind,
            "extraction": self.extraction if math else "last_answer_line" if self.kind == "synthetic" else None,
            "truncated_reward": self.truncated_reward,
            "timeout_s": None if self.kind == "synthetic" else self.timeout_s,
            "packages": {p: _installed_version(p) for p in _MATH_PACKAGES} if math else {},
        }
        if self.plugin is not None:  # (only a plug-in's identity has these keys: the built-ins' hashes stay as they were)
            identity.update(reward=self.plugin.spec, source_sha256=self.plugin.source_sha256)
        return identity

    @property
    def identity_hash(self) -> str:
        """A short stable hash of :attr:`identity` (16 hex digits of its sorted-key JSON's SHA-256)."""
        blob = json.dumps(self.identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def verify(self, texts: Sequence[str], golds: Sequence[Any],
               finish_reasons: Sequence[str | None] | None = None,
               problems: Sequence[Any] | None = None) -> list[Verdict]:
        """One verdict per text, in order; never raises on model output.

        ``finish_reasons`` are the engine's (``"stop"`` | ``"length"``) per text; None means every text finished.
        With ``truncated_reward: zero`` a ``"length"`` text scores 0 with reason ``"truncated"`` and is not
        verified; otherwise it is verified like any other. ``problems`` (one per text: a Problem or a store row
        with problem_id, question and row_json) is what a plug-in is given beside the gold; the built-ins ignore it.
        """
        texts, golds = list(texts), list(golds)
        problems = list(problems) if problems is not None else [None] * len(texts)
        if len(texts) != len(golds) or len(problems) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(golds)} golds and {len(problems)} problems")
        if finish_reasons is not None:
            finish_reasons = list(finish_reasons)
            if len(finish_reasons) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(finish_reasons)} finish_reasons")
        truncated = [self.truncated_reward == "zero" and finish_reasons is not None and finish_reasons[i] == LENGTH
                     for i in range(len(texts))]
        keep = [i for i, t in enumerate(truncated) if not t]
        verified = REWARDS[self.kind](self, [texts[i] for i in keep], [golds[i] for i in keep],
                                      [problems[i] for i in keep])
        verdicts = [Verdict(0.0, None, TRUNCATED)] * len(texts)
        for i, v in zip(keep, verified):
            verdicts[i] = v
        return verdicts


def verify_batch(kind: str, texts: Sequence[str], golds: Sequence[Any], timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 *, extraction: str = DEFAULT_EXTRACTION, truncated_reward: str = DEFAULT_TRUNCATED_REWARD,
                 finish_reasons: Sequence[str | None] | None = None) -> list[Verdict]:
    """:meth:`Verifier.verify` in one call: ``kind`` "synthetic" (inline, no pool) or "math" (worker pool)."""
    return Verifier(kind, extraction, truncated_reward, timeout_s).verify(texts, golds, finish_reasons)


