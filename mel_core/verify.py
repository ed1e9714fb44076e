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
- :func:`extract_synthetic_answer`, :func:`verify_synthetic`: the last ``Answer: N`` line, exact integer match.
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
``timeout_seconds=None`` and enforce the limit ourselves: every item runs in a separate worker process (started with
``subprocess`` + ``sys.executable``, so no ``fork`` of a threaded process, no re-import of the caller's ``__main__``,
and it also works inside daemonic processes such as Dask workers, where ``multiprocessing`` may not start children).
Each item has its own deadline, counted from the moment a *ready* worker receives it (worker start-up, ~1 s for
importing sympy, is not charged to any item). A worker whose item passes its deadline is killed (SIGKILL, so even
C-level loops in big-integer arithmetic stop) and replaced; the other workers keep going, so one stuck item costs
one worker restart and the rest of the batch and later batches still verify.

The pool is created lazily per process (``MEL_VERIFY_WORKERS`` workers, default ``min(os.cpu_count(), 8)``; never
more than the batch has items), reused across calls, and serialised by a lock: concurrent callers from several
threads take turns. A worker address-space cap (``MEL_VERIFY_MEMORY_MB``, default 4096; 0 disables it) turns a
memory blow-up of a pathological answer into ``"error: MemoryError"`` (the item only) instead of an OOM kill of the
machine. Pathological answers seen in testing (``\\boxed{(x+1)^{100000}}``, ``\\boxed{9!!!!!!!}``,
``\\boxed{10^{10^{10}}}`` against an integer gold) hang in sympy for minutes and end as ``"timeout"``.

This module deliberately imports only the standard library at import time; ``math_verify`` is imported in the
workers. It must stay importable as a standalone file (the workers load it by path, bypassing ``mel_core``).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import numbers
import os
import pickle
import re
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "Verdict",
    "Verifier",
    "last_boxed_answer",
    "extract_synthetic_answer",
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
    """A gold answer that cannot be used (not an integer for the synthetic task, unparsable for math)."""


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


def extract_synthetic_answer(text: str | None) -> str | None:
    """The integer on the LAST ``Answer:`` line (``"Answer: -12"`` -> ``"-12"``), or None.

    Only the last ``Answer:`` line counts: if it does not hold exactly one integer (optional leading minus,
    surrounding spaces allowed) the text has no answer, even when an earlier line did. The integer is returned in
    canonical form (``"007"`` -> ``"7"``, ``"-0"`` -> ``"0"``).
    """
    if not isinstance(text, str) or not text:
        return None
    last = None
    for m in _ANSWER_LINE.finditer(text):
        last = m
    if last is None:
        return None
    m = _INTEGER.match(last.group(1))
    if m is None:
        return None
    return str(int(m.group(1)))


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


def verify_synthetic(text: str | None, gold: Any) -> Verdict:
    """Exact integer match of the last ``Answer:`` line against ``gold``; never raises."""
    try:
        extracted = extract_synthetic_answer(text)
    except Exception as e:  # pragma: no cover - the regexes do not raise on str input
        return _error_verdict(e)
    try:
        g = _gold_int(gold)
    except Exception as e:
        return _error_verdict(e, extracted)
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


_OPS = {"math": _math_item, "compare": _compare_item}

_HEADER = struct.Struct("!Q")


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            raise EOFError
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _read_frame(fd: int) -> Any:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return pickle.loads(_read_exact(fd, n))


def _worker_main(req_fd: int, res_fd: int, memory_mb: int = 0) -> None:
    """Worker loop: read ``(op, args)`` frames, answer ``("ok", result)`` or ``("err", reason)``; ``None`` or EOF
    (the parent went away) ends it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    _mv()  # import math_verify/sympy before saying "ready" (start-up is not charged to any item)
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
    _write_frame(res_fd, ("ready", os.getpid()))
    while True:
        try:
            msg = _read_frame(req_fd)
        except (EOFError, OSError):
            return
        if msg is None:
            return
        op, args = msg
        try:
            out = ("ok", _OPS[op](*args))
        except Exception as e:  # MemoryError included (the address-space cap)
            out = ("err", _error_reason(e))
        try:
            _write_frame(res_fd, out)
        except (OSError, pickle.PicklingError):
            return


# ------------------------------------------------------------------------------------------- parent side

# The worker loads this very file under a private module name: no ``mel_core`` package import (whose __init__ may
# grow heavy) and no shadowing of the standard library by files next to this one.
_BOOTSTRAP = (
    "import sys, importlib.util\n"
    "if sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"
    "spec = importlib.util.spec_from_file_location('_mel_verify_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
    "mod._worker_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))\n"
)

_STARTUP_TIMEOUT_S = 120.0  # generous: a loaded 2-core machine can take many seconds to import sympy
_MAX_START_FAILURES = 3


class _Worker:
    def __init__(self, memory_mb: int):
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, os.path.abspath(__file__), str(req_r), str(res_w), str(memory_mb)],
                pass_fds=(req_r, res_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(res_w)
        self.req_fd = req_w
        self.res_fd = res_r
        self.ready = False
        self.started = time.monotonic()

    def send(self, obj: Any) -> None:
        _write_frame(self.req_fd, obj)

    def recv(self) -> Any:
        return _read_frame(self.res_fd)

    def close(self, kill: bool) -> None:
        if kill:
            try:
                self.proc.kill()
            except OSError:
                pass
        else:
            try:
                self.send(None)
            except OSError:
                pass
        for fd in (self.req_fd, self.res_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=None if kill else 2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Pool:
    """Per-process worker pool; items run one per worker with their own deadline (see the module docstring)."""

    def __init__(self, max_workers: int, memory_mb: int):
        self.max_workers = max(1, max_workers)
        self.memory_mb = memory_mb
        self.workers: list[_Worker] = []
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.stats = {"started": 0, "killed_timeout": 0, "crashed": 0}

    def run(self, tasks: Sequence[tuple[str, tuple]], timeout_s: float | None) -> list[tuple[str, Any]]:
        """``(op, args)`` tasks -> ``("ok", result)`` / ``("err", reason)`` / ``("timeout", None)``, in order."""
        if not tasks:
            return []
        with self.lock:
            return self._run(tasks, timeout_s)

    def _spawn(self) -> _Worker:
        w = _Worker(self.memory_mb)
        self.workers.append(w)
        self.stats["started"] += 1
        return w

    def _discard(self, w: _Worker, kill: bool = True) -> None:
        if w in self.workers:
            self.workers.remove(w)
        w.close(kill=kill)

    def _run(self, tasks, timeout_s):
        n = len(tasks)
        results: list[tuple[str, Any] | None] = [None] * n
        pending = deque(range(n))
        want = min(self.max_workers, n)
        for w in list(self.workers):  # drop workers that died while idle
            if w.proc.poll() is not None:
                self._discard(w)
        sel = selectors.DefaultSelector()
        idle: deque[_Worker] = deque()
        starting: dict[_Worker, float] = {}
        busy: dict[_Worker, tuple[int, float]] = {}
        start_failures = 0

        def watch(w: _Worker) -> None:
            sel.register(w.res_fd, selectors.EVENT_READ, w)

        def drop(w: _Worker, kill: bool = True) -> None:
            try:
                sel.unregister(w.res_fd)
            except (KeyError, ValueError):
                pass
            self._discard(w, kill=kill)

        for w in self.workers:
            watch(w)
            if w.ready:
                idle.append(w)
            else:  # started during an earlier batch that finished before it was ready
                starting[w] = w.started + _STARTUP_TIMEOUT_S
        try:
            while pending or busy:
                # start workers up to the target (also replaces killed ones)
                while pending and len(self.workers) < want and start_failures < _MAX_START_FAILURES:
                    try:
                        w = self._spawn()
                    except OSError:
                        start_failures += 1
                        continue
                    watch(w)
                    starting[w] = w.started + _STARTUP_TIMEOUT_S
                if pending and not self.workers:  # nothing can run the rest
                    for i in pending:
                        results[i] = ("err", "error: WorkerStartError")
                    pending.clear()
                    break
                # hand items to ready workers
                while pending and idle:
                    w = idle.popleft()
                    i = pending.popleft()
                    try:
                        w.send(tasks[i])
                    except OSError:  # died while idle: retry the item elsewhere
                        pending.appendleft(i)
                        drop(w)
                        continue
                    busy[w] = (i, time.monotonic() + timeout_s if timeout_s is not None else math.inf)
                if not busy and not starting:
                    continue
                deadlines = [d for _, d in busy.values()] + list(starting.values())
                wait = max(0.0, min(deadlines) - time.monotonic())
                events = sel.select(None if math.isinf(wait) else wait)
                for key, _ in events:
                    w = key.data
                    if w not in busy and w not in starting:  # an idle worker is readable only when it died
                        if w in idle:
                            idle.remove(w)
                        drop(w)
                        continue
                    try:
                        msg = w.recv()
                    except (EOFError, OSError, pickle.UnpicklingError):
                        msg = None
                    if msg is None:  # the process died (segfault, OOM kill, ...)
                        if w in busy:
                            i, _ = busy.pop(w)
                            results[i] = ("err", "error: WorkerCrashed")
                            self.stats["crashed"] += 1
                        else:
                            starting.pop(w, None)
                            start_failures += 1
                        drop(w)
                    elif msg[0] == "ready":
                        starting.pop(w, None)
                        w.ready = True
                        idle.append(w)
                    else:
                        i, _ = busy.pop(w)
                        results[i] = msg
                        idle.append(w)
                now = time.monotonic()
                for w, (i, d) in list(busy.items()):
                    if d <= now:
                        del busy[w]
                        results[i] = ("timeout", None)
                        self.stats["killed_timeout"] += 1
                        drop(w)
                for w, d in list(starting.items()):
                    if d <= now:
                        del starting[w]
                        start_failures += 1
                        drop(w)
        except BaseException:
            # interrupted mid-batch (KeyboardInterrupt, ...): workers in an unknown state are not reused
            for w in list(busy) + list(starting):
                drop(w)
            raise
        finally:
            sel.close()  # workers still starting stay in self.workers; the next batch waits for their "ready"
        return [r if r is not None else ("err", "error: Lost") for r in results]

    def shutdown(self) -> None:
        with self.lock:
            for w in list(self.workers):
                self._discard(w, kill=False)


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
