"""Which failures are worth retrying.

A stage that fails on a config or data error, or on a NaN loss, will fail the same way again: it
fails the run at once with its message. Anything else (I/O, a lock held too long, out of memory, a
pre-empted worker) is treated as transient and retried by the orchestrator's policy.
"""

from __future__ import annotations


class PermanentError(Exception):
    """Mixin: retrying cannot help."""


class InjectedFault(RuntimeError):
    """A transient failure injected by `orchestration.faults` (tests and drills)."""


class InjectedPermanentFault(PermanentError, RuntimeError):
    """A permanent failure injected by `orchestration.faults`."""


_PROGRAMMING_ERRORS = (ValueError, TypeError, KeyError, AttributeError, AssertionError, NotImplementedError)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, _PROGRAMMING_ERRORS):  # config/data errors subclass ValueError
        return False
    return isinstance(exc, Exception)
