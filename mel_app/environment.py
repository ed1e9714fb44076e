"""Prefect's environment for every mel process: state under the working directory (never $HOME), telemetry
off, a temporary server that may start slowly on a loaded machine. Set before Prefect is first imported
(it reads these at import); `mel` and the test suite both call it."""

from __future__ import annotations

import os
from pathlib import Path


def prefect_environment(home: Path | None = None, logging_level: str | None = None) -> None:
    """Defaults for Prefect's variables the caller has not set. `logging_level` (e.g. CRITICAL: mel prints its
    own one-line progress and failure lines) is applied only when given."""
    os.environ.setdefault("PREFECT_HOME", str(home or Path.cwd() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The temporary API server needs more than Prefect's default on a loaded 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if logging_level:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", logging_level)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # its SQLite file cannot create the dir
