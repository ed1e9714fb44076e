"""What the command modules share: Prefect's environment for a command, the store a reader command names, and the
error a user's SQL raises."""

from __future__ import annotations

from pathlib import Path

from mel_app.environment import prefect_environment


class UserSQLError(RuntimeError):
    """The user's SQL failed or asked for something a reader may not do."""


def prefect_env(verbose: bool) -> None:
    """Prefect silent unless -v: mel prints its own one-line progress and failure lines (a failed stage logs one
    line through logger 'mel')."""
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
