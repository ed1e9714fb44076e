"""Progress bars for long loops (warm-start training, generation chunks), on a terminal only.

A bar is drawn only when stderr is a TTY: tests, CI logs, `make demo | tee` and Prefect workers
writing to files get the plain log lines and no carriage-return noise.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = ""):
    """A tqdm bar on stderr, disabled (a plain pass-through) off a terminal; it disappears when done."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not on_terminal())


def log_above(progress, log: Callable[[str], None], line: str) -> None:
    """Log a line above a running bar instead of into it (the bar is cleared, then redrawn)."""
    if getattr(progress, "disable", True):
        log(line)
        return
    with progress.external_write_mode(file=sys.stderr):
        log(line)
