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


def find_db(arg: str | None, root: str | Path = "runs", holds=None) -> Path:
    """The store a reader command names: a run as every command takes it — a run directory, its .duckdb file, a run
    name under `root`, or a run id (mel_core.run.refs.resolve_run). With none given: the store under `root` that
    `holds(reader)` (the one that knows the heuristic or checkpoint id asked about), else the newest, saying which
    it chose when there are several."""
    import sys

    from mel_core.run.refs import RunNotFound, resolve_run
    from mel_core.store.database import MissingStore

    if arg:
        try:
            return resolve_run(arg, root).db
        except RunNotFound:
            raise MissingStore(f"no store at {arg}: not a run directory, a .duckdb file, a run name under {root}/ "
                               f"or the id of a run there") from None
    found = sorted(Path(root).glob("*/mel.duckdb"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise MissingStore(f"no run found under {root}/; name one (a run directory, name or id) with --db")
    if holds is not None:
        from mel_core.store.reader import StoreReader
        for db in found:
            try:
                with StoreReader(db, lock_wait_s=5) as reader:
                    if holds(reader):
                        return db
            except Exception:  # noqa: BLE001 - not a mel store, or unreadable: look further
                continue
    if len(found) > 1:
        print(f"mel: no run given: using {found[0].parent} (the newest of {len(found)} runs under {root}/; "
              f"name another with --db)", file=sys.stderr)
    return found[0]
