"""Math answers: verify a batch of texts against gold answers in the worker pool (math-verify 0.9.0)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from mel_core.algorithm.rewards.boxed import as_boxed_text, last_boxed_answer
from mel_core.algorithm.rewards.pool import check_timeout, shared_pool
from mel_core.algorithm.rewards.verdicts import (
    DEFAULT_EXTRACTION,
    DEFAULT_TIMEOUT_S,
    NO_ANSWER,
    TIMEOUT,
    Verdict,
    error_verdict,
    normalize_gold,
)
from mel_core.vocabulary import EXTRACTIONS

# ------------------------------------------------------------------------------------------- math API

def _as_text(text: Any) -> str:
    if text is None:
        return ""
    return text if isinstance(text, str) else str(text)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r} (expected one of {allowed})")
    return value


def _math_pred_text(text: Any, extraction: str) -> str | None:
    """What the worker parses as the model's answer: the whole text (``math_verify``) or its last box alone
    (``boxed_last``); None when ``boxed_last`` finds no box (the item is ``no_answer`` without a worker)."""
    if extraction == "math_verify":
        return _as_text(text)
    content = last_boxed_answer(_as_text(text))
    return None if content is None else as_boxed_text(content)


def verify_math_batch(texts: Sequence[str], golds: Sequence[Any], timeout_s: float | None = DEFAULT_TIMEOUT_S, *,
                      extraction: str = DEFAULT_EXTRACTION,
                      _test_delay_s: Sequence[float] | None = None) -> list[Verdict]:
    """Verify many model texts at once (all items submitted to the worker pool together); never raises on model
    output. ``extraction`` is ``"boxed_last"`` (the last ``\\boxed{}`` only; no box: ``no_answer``) or
    ``"math_verify"`` (math-verify's default chain on the whole text). ``timeout_s`` is per item, from the moment a
    worker starts it. ``_test_delay_s`` is a test-only hook (per-item sleep inside the worker, see
    :func:`_math_item`)."""
    texts, golds = list(texts), list(golds)
    if len(texts) != len(golds):
        raise ValueError(f"{len(texts)} texts but {len(golds)} golds")
    timeout_s = check_timeout(timeout_s)
    check_choice("extraction", extraction, EXTRACTIONS)
    delays = list(_test_delay_s) if _test_delay_s is not None else [0.0] * len(texts)
    if len(delays) != len(texts):
        raise ValueError("_test_delay_s must have one entry per text")
    verdicts: list[Verdict | None] = [None] * len(texts)
    tasks, where = [], []
    for i, (text, gold) in enumerate(zip(texts, golds)):
        try:
            g = normalize_gold(gold)
        except Exception as e:
            verdicts[i] = error_verdict(e)
            continue
        pred = _math_pred_text(text, extraction)
        if pred is None:
            verdicts[i] = Verdict(0.0, None, NO_ANSWER)
            continue
        args = (pred, g) + ((float(delays[i]),) if delays[i] else ())
        tasks.append(("math", args))
        where.append(i)
    for i, (status, payload) in zip(where, shared_pool().run(tasks, timeout_s)):
        if status == "ok":
            reward, extracted, reason = payload
            verdicts[i] = Verdict(float(reward), extracted, reason)
        elif status == "timeout":
            verdicts[i] = Verdict(0.0, None, TIMEOUT)
        else:
            verdicts[i] = Verdict(0.0, None, str(payload))
    return verdicts  # type: ignore[return-value]


def verify_math(text: str, gold: Any, timeout_s: float | None = DEFAULT_TIMEOUT_S, *,
                extraction: str = DEFAULT_EXTRACTION) -> Verdict:
    """One math item (see :func:`verify_math_batch`)."""
    return verify_math_batch([text], [gold], timeout_s, extraction=extraction)[0]


# ------------------------------------------------------------------------------------------- Math-Verify's helper

_COMPARE_DEFAULTS = {"match_types": ("latex", "expr"), "float_rounding": 6, "strict": True,
                     "allow_set_relation_comp": False}


def _compare_args(case: Mapping[str, Any]) -> tuple:
    o = {**_COMPARE_DEFAULTS, **{k: v for k, v in case.items() if k in _COMPARE_DEFAULTS}}
    mt = o["match_types"]
    return (str(case["gold"]), str(case["pred"]), None if mt is None else tuple(mt), int(o["float_rounding"]),
            bool(o["strict"]), bool(o["allow_set_relation_comp"]))


def compare_batch(cases: Iterable[Mapping[str, Any]], timeout_s: float | None = DEFAULT_TIMEOUT_S) -> list[bool]:
    """:func:`compare` for many cases at once; each case is a mapping with ``gold``, ``pred`` and optionally
    ``match_types`` / ``float_rounding`` / ``strict`` / ``allow_set_relation_comp``. Timeouts and errors give False
    (as math-verify itself does)."""
    tasks = [("compare", _compare_args(c)) for c in cases]
    return [status == "ok" and bool(payload) for status, payload in shared_pool().run(tasks, check_timeout(timeout_s))]


def compare(gold: str, pred: str, match_types: Sequence[str] | None = ("latex", "expr"), float_rounding: int = 6,
            strict: bool = True, allow_set_relation_comp: bool = False,
            timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Math-Verify's test helper ``compare_strings``: ``latex`` -> ``LatexExtractionConfig(boxed_match_priority=0)``,
    ``expr`` -> ``ExprExtractionConfig()``, then ``verify(parse(gold, cfgs), parse(pred, cfgs), float_rounding=...,
    strict=..., allow_set_relation_comp=...)``. ``match_types=None`` means plain ``verify(parse(gold), parse(pred))``
    with math-verify's default configs. Runs in the worker pool with a deadline."""
    return compare_batch([{"gold": gold, "pred": pred, "match_types": match_types, "float_rounding": float_rounding,
                           "strict": strict, "allow_set_relation_comp": allow_set_relation_comp}], timeout_s)[0]
