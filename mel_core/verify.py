"""Reward verification: the embedded synthetic task (``Answer: N``) and math answers (``\\boxed{}``).

Public API
----------
- :class:`Verifier` ``(kind, extraction, truncated_reward, timeout_s)``: what the pipeline calls.
  ``Verifier.from_config(cfg.verify, reward_kind)``; ``.verify(texts, golds, finish_reasons=None)`` gives one
  :class:`Verdict` per text; ``.identity`` (a JSON-able dict: logic version, kind, settings, math-verify's and its
  parser's installed versions) and ``.identity_hash`` (16 hex digits) say what produced the verdicts.
- :class:`Verdict` ``(reward, extracted, reason)``; ``reason`` is one of ``"correct"``, ``"wrong_answer"``,
  ``"no_answer"``, ``"truncated"``, ``"timeout"`` or ``"error: <ExceptionType>"``.
- Extraction of math answers (``extraction``): ``"boxed_last"`` (default) reads only the content of the LAST
  ``\\boxed{...}`` / ``\\fbox{...}`` (:func:`last_boxed_answer`, in this process) and has math-verify parse that
  box alone; a text without one is ``no_answer`` and never reaches a worker. ``"math_verify"`` hands the whole text
  to math-verify's default extraction chain (which falls back to the last number in the text, and merges nearby
  boxes into a set).
- Truncated completions (``truncated_reward``, with ``finish_reasons``): ``"zero"`` (default) scores a completion
  cut at the length limit (``finish_reason == "length"``) 0 with reason ``"truncated"`` without verifying it;
  ``"verify"`` verifies it like any other.
- :func:`extract_synthetic_answer`, :func:`verify_synthetic`: the last ``Answer: N`` line, exact integer match (a gold
  that is not an integer, such as the rules world's ``three``: exact match of the line's stripped content).
- :func:`verify_math`, :func:`verify_math_batch`: math-verify 0.9.0, gold parsed as ``"$" + gold + "$"``, the model
  answer with math-verify's default extraction configs, ``verify(gold, pred)``.
- :func:`verify_batch` ``(kind, texts, golds, timeout_s, ...)``: a one-call :meth:`Verifier.verify`;
  :func:`reward_kind_for_source` picks the kind from ``data.source``.
- :func:`normalize_gold`: dataset answers (int / float / LaTeX str / GSM8K ``#### n`` text) to a string.
- :func:`compare`, :func:`compare_batch`: Math-Verify's own test helper (``compare_strings``) through the same
  worker machinery; used to reproduce Math-Verify's test labels.
- :func:`shutdown_pool`: stop the worker processes (also done at interpreter exit).

Why worker processes
--------------------
math-verify's ``parse``/``verify`` enforce their time limit with ``signal.alarm``, which raises ``ValueError`` outside
the main thread, i.e. inside Prefect's thread-pool task bodies. We call them with ``parsing_timeout=None`` /
``timeout_seconds=None`` and enforce the limit ourselves: every item runs in a worker process of a
``pebble.ProcessPool`` (pebble 5.2.3), whose per-task ``timeout`` is what we need:

- Each item has its own deadline, counted from the moment a worker takes it (pebble stamps the task when the worker
  acknowledges it; worker start-up, ~1 s for importing sympy in the initializer, is not charged to any item).
- A worker whose item passes its deadline is killed and replaced; the other workers keep going, so one stuck item
  costs one worker restart and the rest of the batch and later batches still verify (``"timeout"``). pebble sends
  SIGTERM, then SIGKILL 3 s later; our initializer restores SIGTERM's default action so the worker ends at once even
  inside C code that never checks for signals.
- A worker that dies mid-item (segfault, OOM kill) costs that item (``"error: WorkerCrashed"``). When one dies while
  none of the pool's items is running (killed while idle), pebble declares the whole pool broken and aborts every
  item given to it; we start a new pool and give those items one more try (measured: without it, a batch sent right
  after an idle worker's death was all ``"error: BrokenProcessPool"``).
- Workers run under an address-space cap (``MEL_VERIFY_MEMORY_MB``, default 4096; 0 disables it), so a memory
  blow-up of a pathological answer is ``"error: MemoryError"`` for that item instead of an OOM kill of the machine.
- Workers are started with multiprocessing's ``spawn``: a fresh interpreter, never a ``fork`` of this threaded
  process.
- The pool is created lazily per process (``MEL_VERIFY_WORKERS`` workers, default ``min(os.cpu_count(), 8)``),
  reused across calls, and serialised by a lock: concurrent callers from several threads take turns.

Pathological answers seen in testing (``\\boxed{(x+1)^{100000}}``, ``\\boxed{9!!!!!!!}``,
``\\boxed{10^{10^{10}}}`` against an integer gold) hang in sympy for minutes and end as ``"timeout"``.

pebble replaced ~300 lines of our own pool (subprocess workers, pipe framing, a selector loop). Measured on MATH-500's
500 human solutions with 2 workers on a shared 2-core machine (``benchmarks/verify.py``, 6 paired runs of each,
medians): our pool 548 items/s (boxed_last) / 624 (math_verify), pebble 542 / 641, equal within the run-to-run spread
(430-820 items/s); cold start to the first verdicts 0.49 s vs 0.65 s; a 40-item batch with one item stuck past a
1 s deadline 1.01 s vs 1.02-1.10 s (pebble checks deadlines every 0.1 s). What the change gave up, on purpose:

- ``spawn`` re-imports the caller's ``__main__`` script in every worker: a script that verifies at import level,
  without an ``if __name__ == "__main__":`` guard, gets ``"error: BrokenProcessPool"`` for every item (with
  ``forkserver`` the same script hung; hence spawn). Every entry point of this project is guarded.
- multiprocessing refuses to start children from a daemonic process (e.g. a ``multiprocessing`` daemon worker):
  verifying there raises ``AssertionError``. Nothing in this project verifies in one (Prefect runs tasks in
  threads; Ray workers are not daemonic). Our subprocess workers had worked there.
- Worker start-up has no time limit: a worker that hung while importing would hold its items (ours gave up on a
  worker after 120 s).
- A worker that pebble is still spawning when the interpreter exits prints a ``FileNotFoundError`` traceback (its
  semaphore is gone); harmless.

This module deliberately imports only the standard library at import time; ``pebble`` is imported when the first
math item is verified and ``math_verify`` only in the workers.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import numbers
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "Verdict",
    "Verifier",
    "last_boxed_answer",
    "extract_synthetic_answer",
    "extract_synthetic_text",
    "verify_synthetic",
    "verify_math",
    "verify_math_batch",
    "verify_batch",
    "reward_kind_for_source",
    "normalize_gold",
    "compare",
    "compare_batch",
    "shutdown_pool",
    "REWARD_KINDS",
    "EXTRACTIONS",
    "TRUNCATED_REWARDS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_EXTRACTION",
    "DEFAULT_TRUNCATED_REWARD",
    "VERIFIER_VERSION",
]

REWARD_KINDS = ("synthetic", "math")
# How the answer is found in a math text: the last \boxed{} only, or math-verify's own extraction chain.
EXTRACTIONS = ("boxed_last", "math_verify")
# What a rollout cut at the length limit (finish_reason "length") scores: 0, or whatever verification says.
TRUNCATED_REWARDS = ("zero", "verify")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_EXTRACTION = "boxed_last"
DEFAULT_TRUNCATED_REWARD = "zero"
# Bump when the verification logic changes in a way that can change a verdict: it is part of Verifier.identity.
VERIFIER_VERSION = 1

CORRECT = "correct"
WRONG = "wrong_answer"
NO_ANSWER = "no_answer"
TIMEOUT = "timeout"
TRUNCATED = "truncated"
LENGTH = "length"  # the finish_reason of a completion cut at the length limit (mel_core.engines.base.Completion)


@dataclass(frozen=True)
class Verdict:
    reward: float
    extracted: str | None
    reason: str


class GoldError(ValueError):
    """A gold answer that cannot be used (empty for the synthetic task, unparsable for math)."""


def _error_reason(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}"


def _error_verdict(exc: BaseException, extracted: str | None = None) -> Verdict:
    return Verdict(0.0, extracted, _error_reason(exc))


# ------------------------------------------------------------------------------------------- gold answers

_GSM8K_MARK = "####"
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def normalize_gold(value: Any) -> str:
    """A dataset answer as a string: ints as is, integral floats as ints (``27.0`` -> ``"27"``), strings stripped.

    GSM8K rationales (``"... #### 1,000"``) become the text after the last ``####`` with comma thousands
    separators removed (``"1000"``). Other strings keep their commas (``"(1,2)"`` is a LaTeX tuple).
    Raises ``TypeError``/``ValueError`` for values that are not answers (None, bool, NaN, inf).
    """
    if isinstance(value, bool) or value is None:
        raise TypeError(f"not a gold answer: {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"not a gold answer: {value!r}")
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"not a gold answer: {type(value).__name__}")
    s = value.strip()
    if _GSM8K_MARK in s:
        s = s.rsplit(_GSM8K_MARK, 1)[1].strip()
        if _THOUSANDS.match(s):
            s = s.replace(",", "")
    return s


# ------------------------------------------------------------------------------------------- synthetic task

_ANSWER_LINE = re.compile(r"^[ \t]*Answer:(.*)$", re.MULTILINE)
_INTEGER = re.compile(r"^\s*(-?\d+)\s*$")


def _last_answer_line(text: str | None) -> str | None:
    """What follows ``Answer:`` on the LAST such line, stripped; None when there is no such line."""
    if not isinstance(text, str) or not text:
        return None
    last = None
    for m in _ANSWER_LINE.finditer(text):
        last = m
    return None if last is None else last.group(1).strip()


def extract_synthetic_answer(text: str | None) -> str | None:
    """The integer on the LAST ``Answer:`` line (``"Answer: -12"`` -> ``"-12"``), or None.

    Only the last ``Answer:`` line counts: if it does not hold exactly one integer (optional leading minus,
    surrounding spaces allowed) the text has no answer, even when an earlier line did. The integer is returned in
    canonical form (``"007"`` -> ``"7"``, ``"-0"`` -> ``"0"``).
    """
    content = _last_answer_line(text)
    m = _INTEGER.match(content) if content is not None else None
    return None if m is None else str(int(m.group(1)))


def extract_synthetic_text(text: str | None) -> str | None:
    """The whole content of the LAST ``Answer:`` line, stripped (``"Answer:  three "`` -> ``"three"``), or None
    when there is no such line or it is empty: the answer of a world whose answers are not integers."""
    return _last_answer_line(text) or None


def _gold_int(gold: Any) -> int:
    g = normalize_gold(gold)
    m = _INTEGER.match(g)
    if m is None:
        try:  # "27.0" as a string
            f = float(g)
        except ValueError:
            raise GoldError(f"synthetic gold is not an integer: {g!r}") from None
        if not (math.isfinite(f) and f.is_integer()):
            raise GoldError(f"synthetic gold is not an integer: {g!r}")
        return int(f)
    return int(m.group(1))


def _is_integer_gold(gold: Any) -> bool:
    try:
        _gold_int(gold)
    except (GoldError, TypeError, ValueError):
        return False
    return True


def verify_synthetic(text: str | None, gold: Any) -> Verdict:
    """The last ``Answer:`` line against ``gold``; never raises.

    An integer gold (``7``, ``"-12"``, ``27.0``) needs exactly one integer there, compared as integers (``007`` is
    7; ``"Answer: seven"`` has no answer). Any other gold (the rules world's ``"three"``) is compared as a string:
    the line's whole content, stripped, must equal the stripped gold exactly (case and inner spaces count).
    """
    if not _is_integer_gold(gold):
        try:
            g = normalize_gold(gold)
            if not g:
                raise GoldError("synthetic gold is empty")
        except Exception as e:
            return _error_verdict(e, extract_synthetic_text(text))
        extracted = extract_synthetic_text(text)
        if extracted is None:
            return Verdict(0.0, None, NO_ANSWER)
        return Verdict(1.0, extracted, CORRECT) if extracted == g else Verdict(0.0, extracted, WRONG)
    try:
        extracted = extract_synthetic_answer(text)
    except Exception as e:  # pragma: no cover - the regexes do not raise on str input
        return _error_verdict(e)
    g = _gold_int(gold)
    if extracted is None:
        return Verdict(0.0, None, NO_ANSWER)
    return Verdict(1.0, extracted, CORRECT) if int(extracted) == g else Verdict(0.0, extracted, WRONG)


# ------------------------------------------------------------------------------------------- boxed answers
# Runs in the parent: plain string scanning, so texts without a boxed answer never reach a worker.

# \boxed or \fbox as a whole command name (not the start of a longer one such as \boxedtext).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The argument of a brace-less \boxed 5: one run of characters up to whitespace, a math delimiter or a brace.
_BARE_ARGUMENT = re.compile(r"[^\s${}]+")


def _braced_group(text: str, open_pos: int) -> str | None:
    r"""The text inside the brace group opening at ``text[open_pos] == "{"``, or None if it never closes.

    Escaped characters (``\{``, ``\}``, ``\\``) are skipped as LaTeX does, so ``\{1,2\}`` nests nothing.
    """
    depth = 0
    i, n = open_pos, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
        i += 1
    return None


def last_boxed_answer(text: str | None) -> str | None:
    r"""The content of the LAST ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, stripped; None if there is none.

    Nested braces are balanced (``\boxed{\frac{1}{2}}`` -> ``\frac{1}{2}``); a brace-less ``\boxed 5`` gives the
    run of characters after it (``5``, trailing ``.,;:`` dropped). Only the last box counts, as in the MATH
    reference code (``last_boxed_only_string``): when it is unusable (never closed, as in a text cut off inside it,
    or empty) the text has no answer, even when an earlier box was complete.
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced_group(text, i)
    else:
        m = _BARE_ARGUMENT.match(text, i)
        content = m.group(0).rstrip(".,;:") if m else None
    if content is None or not content.strip():
        return None
    return content.strip()


def _as_boxed_text(content: str) -> str:
    """What math-verify parses for a ``boxed_last`` answer: the one box alone, so its boxed rule extracts it."""
    return "\\boxed{" + content + "}"


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


def _test_crash() -> None:
    """TEST-ONLY op: the worker dies mid-item (as a segfault or an OOM kill would end it)."""
    os.kill(os.getpid(), signal.SIGKILL)


def _test_alloc(nbytes: int) -> int:
    """TEST-ONLY op: allocate ``nbytes`` (over the address-space cap: MemoryError, for this item only)."""
    return len(bytearray(nbytes))


_OPS = {"math": _math_item, "compare": _compare_item, "_test_crash": _test_crash, "_test_alloc": _test_alloc}


def _worker_init(memory_mb: int) -> None:
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


def _run_op(op: str, args: tuple) -> tuple[str, Any]:
    """One item in a worker: ``("ok", result)`` or ``("err", reason)`` (exceptions are answered, not raised, so no
    traceback is pickled back)."""
    try:
        return "ok", _OPS[op](*args)
    except Exception as e:  # MemoryError included (the address-space cap)
        return "err", _error_reason(e)


# ------------------------------------------------------------------------------------------- parent side

# Workers are started by multiprocessing's "spawn": a fresh interpreter, never a fork of this (threaded) process.
# (forkserver would restart killed workers faster, but a caller script without an ``if __name__ == "__main__"``
# guard hangs it instead of failing; see the module docstring.)
_START_METHOD = "spawn"
_BROKEN_POOL = "error: BrokenProcessPool"


class _Pool:
    """Per-process worker pool on ``pebble.ProcessPool``; items run one per worker with their own deadline (see the
    module docstring). Calls from several threads take turns (one batch at a time)."""

    def __init__(self, max_workers: int, memory_mb: int):
        self.max_workers = max(1, max_workers)
        self.memory_mb = memory_mb
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.stats = {"pools_started": 0, "killed_timeout": 0, "crashed": 0}
        self._pebble = None  # the pebble.ProcessPool, started on first use

    def _running_pool(self):
        """The pebble pool, started on first use and restarted when pebble has given up on it (ERROR state, e.g.
        after a worker died while no item was running)."""
        import multiprocessing

        import pebble

        if self._pebble is not None and not self._pebble.active:
            self._stop()
        if self._pebble is None:
            self._pebble = pebble.ProcessPool(self.max_workers, initializer=_worker_init, initargs=(self.memory_mb,),
                                              context=multiprocessing.get_context(_START_METHOD))
            self.stats["pools_started"] += 1
        return self._pebble

    def run(self, tasks: Sequence[tuple[str, tuple]], timeout_s: float | None) -> list[tuple[str, Any]]:
        """``(op, args)`` tasks -> ``("ok", result)`` / ``("err", reason)`` / ``("timeout", None)``, in order."""
        if not tasks:
            return []
        with self.lock:
            results = self._run_on_pool(tasks, timeout_s)
            # pebble aborts every task of a pool it declares broken, which it does when a worker dies while none of
            # the pool's items is running yet (e.g. killed while idle, just before this batch): those items get
            # one more try, on a new pool.
            broken = [i for i, r in enumerate(results) if r == ("err", _BROKEN_POOL)]
            if broken:
                for i, r in zip(broken, self._run_on_pool([tasks[i] for i in broken], timeout_s)):
                    results[i] = r
            return results

    def _run_on_pool(self, tasks, timeout_s):
        pool = self._running_pool()
        futures = [pool.schedule(_run_op, args=(op, args), timeout=timeout_s) for op, args in tasks]
        return [self._outcome(f) for f in futures]

    def _outcome(self, future) -> tuple[str, Any]:
        import concurrent.futures

        import pebble

        try:
            return future.result()
        except concurrent.futures.TimeoutError:  # pebble killed the worker at the item's deadline
            self.stats["killed_timeout"] += 1
            return "timeout", None
        except pebble.ProcessExpired:  # the worker died mid-item (segfault, OOM kill, ...)
            self.stats["crashed"] += 1
            return "err", "error: WorkerCrashed"
        except Exception as e:  # the pool itself failed (e.g. BrokenProcessPool: no worker could start)
            return "err", _error_reason(e)

    def worker_pids(self) -> list[int]:
        """The live workers' process ids (for tests and diagnostics)."""
        import multiprocessing

        return [p.pid for p in multiprocessing.active_children() if p.name == "pebble_pool_worker"]  # pebble's name

    def _stop(self) -> None:
        pool, self._pebble = self._pebble, None
        if pool is not None:
            pool.stop()
            pool.join()

    def shutdown(self) -> None:
        with self.lock:
            self._stop()


_POOL: _Pool | None = None
_POOL_GUARD = threading.Lock()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _pool() -> _Pool:
    global _POOL
    with _POOL_GUARD:
        if _POOL is None or _POOL.pid != os.getpid():  # (a forked child must not share its parent's workers)
            _POOL = _Pool(_env_int("MEL_VERIFY_WORKERS", min(os.cpu_count() or 1, 8)),
                          _env_int("MEL_VERIFY_MEMORY_MB", 4096))
        return _POOL


def shutdown_pool() -> None:
    """Stop the verification workers of this process (a later call starts new ones)."""
    global _POOL
    with _POOL_GUARD:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown_pool)


def _check_timeout(timeout_s: float | None) -> float | None:
    if timeout_s is None:
        return None
    t = float(timeout_s)
    if not t > 0:
        raise ValueError(f"timeout_s must be > 0 (or None for no limit), got {timeout_s!r}")
    return t


# ------------------------------------------------------------------------------------------- math API

def _as_text(text: Any) -> str:
    if text is None:
        return ""
    return text if isinstance(text, str) else str(text)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r} (expected one of {allowed})")
    return value


def _math_pred_text(text: Any, extraction: str) -> str | None:
    """What the worker parses as the model's answer: the whole text (``math_verify``) or its last box alone
    (``boxed_last``); None when ``boxed_last`` finds no box (the item is ``no_answer`` without a worker)."""
    if extraction == "math_verify":
        return _as_text(text)
    content = last_boxed_answer(_as_text(text))
    return None if content is None else _as_boxed_text(content)


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
    timeout_s = _check_timeout(timeout_s)
    _check_choice("extraction", extraction, EXTRACTIONS)
    delays = list(_test_delay_s) if _test_delay_s is not None else [0.0] * len(texts)
    if len(delays) != len(texts):
        raise ValueError("_test_delay_s must have one entry per text")
    verdicts: list[Verdict | None] = [None] * len(texts)
    tasks, where = [], []
    for i, (text, gold) in enumerate(zip(texts, golds)):
        try:
            g = normalize_gold(gold)
        except Exception as e:
            verdicts[i] = _error_verdict(e)
            continue
        pred = _math_pred_text(text, extraction)
        if pred is None:
            verdicts[i] = Verdict(0.0, None, NO_ANSWER)
            continue
        args = (pred, g) + ((float(delays[i]),) if delays[i] else ())
        tasks.append(("math", args))
        where.append(i)
    for i, (status, payload) in zip(where, _pool().run(tasks, timeout_s)):
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


def reward_kind_for_source(source: str) -> str:
    """``"synthetic"`` for the embedded task (``data.source: synthetic``), ``"math"`` for any dataset file."""
    return "synthetic" if str(source).strip().lower() == "synthetic" else "math"


# ------------------------------------------------------------------------------------------- the pipeline's verifier

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
        _check_choice("reward kind", self.kind, REWARD_KINDS)
        _check_choice("extraction", self.extraction, EXTRACTIONS)
        _check_choice("truncated_reward", self.truncated_reward, TRUNCATED_REWARDS)
        object.__setattr__(self, "timeout_s", _check_timeout(self.timeout_s))

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
    return [status == "ok" and bool(payload) for status, payload in _pool().run(tasks, _check_timeout(timeout_s))]


def compare(gold: str, pred: str, match_types: Sequence[str] | None = ("latex", "expr"), float_rounding: int = 6,
            strict: bool = True, allow_set_relation_comp: bool = False,
            timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Math-Verify's test helper ``compare_strings``: ``latex`` -> ``LatexExtractionConfig(boxed_match_priority=0)``,
    ``expr`` -> ``ExprExtractionConfig()``, then ``verify(parse(gold, cfgs), parse(pred, cfgs), float_rounding=...,
    strict=..., allow_set_relation_comp=...)``. ``match_types=None`` means plain ``verify(parse(gold), parse(pred))``
    with math-verify's default configs. Runs in the worker pool with a deadline."""
    return compare_batch([{"gold": gold, "pred": pred, "match_types": match_types, "float_rounding": float_rounding,
                           "strict": strict, "allow_set_relation_comp": allow_set_relation_comp}], timeout_s)[0]
