"""What the command modules share: Prefect's environment for a command, the store a reader command names, and the
error a user's SQL raises."""

from __future__ import annotations

import os
from pathlib import Path

from mel_app.environment import prefect_environment


class UserSQLError(RuntimeError):
    """The user's SQL failed or asked for something a reader may not do."""


QUIET_LOGGING = Path(__file__).with_name("prefect_logging.yml")


def prefect_env(verbose: bool) -> None:
    """Prefect silent on the terminal unless -v: mel prints its own one-line progress and failure lines (a failed
    stage logs one line through logger 'mel'); the flow and task runs' logs still reach Prefect's API and UI
    (prefect_logging.yml)."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(QUIET_LOGGING))
    elif os.environ.get("PREFECT_LOGGING_SETTINGS_PATH") == str(QUIET_LOGGING):
        del os.environ["PREFECT_LOGGING_SETTINGS_PATH"]  # inherited from a quiet mel: -v shows Prefect's run logs
    prefect_environment(logging_level="INFO" if verbose else "CRITICAL")


def find_db(arg: str | None) -> Path:
    """The store a reader command names (a file or a run directory), else the newest under ./runs."""
    from mel_core.store.database import MissingStore

    if arg:
        p = Path(arg)
        p = p / "mel.duckdb" if p.is_dir() else p
        if not p.is_file():
            raise MissingStore(f"no store at {p}")
        return p
    found = sorted(Path("runs").glob("*/mel.duckdb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise MissingStore("no run found under ./runs; pass --db PATH")
    return found[-1]
