"""What runs inside the verification worker processes, one item at a time: math-verify's parse and verify, and
reward plug-ins (mel_core.algorithm.rewards.plugins)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from mel_core.algorithm.rewards.verdicts import CORRECT, NO_ANSWER, WRONG, GoldError, error_reason

# ------------------------------------------------------------------------------------------- worker side
# Everything in this section runs inside the worker processes (their main thread).

_MV = None  # the imported math_verify module, in workers only


def _mv():
    global _MV
    if _MV is None:
        import logging

        # We pass timeout=None on purpose (the parent enforces the limit); silence math-verify's one-time warning
        # about it and its per-item debug/warning chatter.
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        import math_verify

        _MV = math_verify
    return _MV


def _math_item(text: str, gold: str, _test_delay_s: float = 0.0) -> tuple[float, str | None, str]:
    """Verify one model text against one gold answer; returns ``(reward, extracted, reason)``.

    ``_test_delay_s`` is a TEST-ONLY hook: the worker sleeps that long before verifying, to exercise the deadline
    path deterministically (``verify_math_batch(..., _test_delay_s=[...])``). The pipeline never sets it.
    """
    if _test_delay_s:
        time.sleep(_test_delay_s)
    mv = _mv()
    gold_parsed = mv.parse("$" + gold + "$", parsing_timeout=None)
    if not gold_parsed:
        raise GoldError("math-verify extracts nothing from the gold answer")
    pred_parsed = mv.parse(text, parsing_timeout=None)
    if not pred_parsed:
        return 0.0, None, NO_ANSWER
    # parse() returns [sympy object, matched string]; the string is what the model wrote.
    extracted = pred_parsed[-1] if isinstance(pred_parsed[-1], str) else str(pred_parsed[0])
    ok = mv.verify(gold_parsed, pred_parsed, timeout_seconds=None)
    return (1.0, extracted, CORRECT) if ok else (0.0, extracted, WRONG)


def _extraction_configs(match_types):
    mv = _mv()
    if match_types is None:  # math-verify's defaults, as parse(x) uses them
        return [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    cfgs = []
    for t in match_types:
        if t == "latex":
            cfgs.append(mv.LatexExtractionConfig(boxed_match_priority=0))
        elif t == "expr":
            cfgs.append(mv.ExprExtractionConfig())
        else:
            raise ValueError(f"unknown match type {t!r} (expected 'latex' or 'expr')")
    return cfgs


def _compare_item(gold: str, pred: str, match_types, float_rounding: int, strict: bool,
                  allow_set_relation_comp: bool) -> bool:
    """Math-Verify's ``compare_strings`` test helper (``match_types=None``: plain ``verify(parse(g), parse(p))``)."""
    mv = _mv()
    cfgs = _extraction_configs(match_types)
    g = mv.parse(gold, cfgs, parsing_timeout=None)
    p = mv.parse(pred, cfgs, parsing_timeout=None)
    return bool(mv.verify(g, p, float_rounding=float_rounding, strict=strict,
                          allow_set_relation_comp=allow_set_relation_comp, timeout_seconds=None))


def _plugin_item(module: str, function: str, search_dir: str, text: str, problem: dict) -> tuple[float, None, str]:
    """A reward plug-in (verify.reward: module:function) on one completion: its value judged as a reward."""
    from mel_core.algorithm.rewards.plugins import judge, load_function

    reward, reason = judge(load_function(module, function, search_dir)(text, problem))
    return reward, None, reason


def _test_crash() -> None:
    """TEST-ONLY op: the worker dies mid-item (as a segfault or an OOM kill would end it)."""
    os.kill(os.getpid(), signal.SIGKILL)


def _test_alloc(nbytes: int) -> int:
    """TEST-ONLY op: allocate ``nbytes`` (over the address-space cap: MemoryError, for this item only)."""
    return len(bytearray(nbytes))


_OPS = {"math": _math_item, "compare": _compare_item, "plugin": _plugin_item, "_test_crash": _test_crash, "_test_alloc": _test_alloc}


def worker_init(memory_mb: int) -> None:
    """pebble's worker initializer: runs once per worker, before it takes its first item."""
    # pebble installs a Python-level SIGTERM handler in its workers, and kills a worker past its deadline with
    # SIGTERM, then SIGKILL 3 s later. A Python handler runs only between bytecodes or where C code checks for
    # signals (CPython's big-integer arithmetic does; not all C code does), so a worker stuck in C code that does
    # not check would keep its core for those 3 s; the default action ends it at once wherever it is.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _mv()  # import math_verify/sympy before taking an item (start-up is not charged to any item's deadline)
    if memory_mb > 0:
        try:
            import resource

            cap = memory_mb << 20
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                cap = min(cap, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        except (ImportError, ValueError, OSError):
            pass


def run_op(op: str, args: tuple) -> tuple[str, Any]:
    """One item in a worker: ``("ok", result)`` or ``("err", reason)`` (exceptions are answered, not raised, so no
    traceback is pickled back)."""
    try:
        return "ok", _OPS[op](*args)
    except Exception as e:  # MemoryError included (the address-space cap)
        return "err", error_reason(e)


