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


class Interrupted(KeyboardInterrupt):
    """A stop by signal, raised in the main thread by `mel run`'s handler (mel_app.interrupts): Ctrl-C (SIGINT) or
    SIGTERM. A KeyboardInterrupt, so everything that already stops cleanly on Ctrl-C (Prefect's engine marking its
    runs Crashed, `finally` blocks, the run lock's release) stops the same way on SIGTERM."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interruption(exc: BaseException) -> str | None:
    """'SIGINT' or 'SIGTERM' when `exc` stops the process on a signal, else None: a KeyboardInterrupt (Ctrl-C, or
    mel's Interrupted), or the TerminationSignal Prefect's flow engine raises on SIGTERM while a flow runs (matched
    by name and its `signal` attribute: mel_core imports no orchestrator)."""
    import signal

    if isinstance(exc, Interrupted):
        return signal.Signals(exc.signum).name
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    signum = getattr(exc, "signal", None)
    if type(exc).__name__ == "TerminationSignal" and isinstance(signum, int):
        return signal.Signals(signum).name
    return None
