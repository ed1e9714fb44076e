"""mel's Python API: what `mel run` and `mel query` do, from a notebook or a script.

    import mel                                             # before Prefect: mel sets Prefect's environment up

    cfg = mel.load_config("configs/tiny.yaml", ["run.steps=2", "run.name=notebook"])
    result = mel.run(cfg)                                  # a whole campaign; resumable like `mel run`
    with mel.open_run(result["run_dir"]) as store:         # read-only, with `mel query`'s limits
        rows = store.query("SELECT step, reward_mean, accepted FROM step_summary ORDER BY step")

A run is named as every `mel` command names one: a run directory, its .duckdb file, a run name under
`root` (default ./runs) or a run id. Nothing here prints a summary or installs signal handlers: a campaign
interrupted in a notebook (the kernel's interrupt) stops with KeyboardInterrupt and resumes when run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["MelConfig", "load_config", "run", "open_run", "ReaderLimits"]

from mel_core.config import MelConfig  # noqa: E402  (the types a caller handles)
from mel_core.store.reader import ReaderLimits  # noqa: E402


def load_config(path: str | Path = "configs/tiny.yaml", overrides: Sequence[str] = ()) -> MelConfig:
    """A validated config: the YAML file (its `extends:` chain) with `key=value` overrides; a bad value raises
    mel_core.config.ConfigError naming its key and where it was set."""
    from mel_core import config

    return config.load(path, list(overrides))


def run(config: MelConfig | str | Path, overrides: Sequence[str] = (), *, verbose: bool = False) -> dict:
    """Run (or resume) the campaign of `config` — a loaded config, or a path with `overrides` — to its last step,
    refused first for everything `mel run` refuses (dataset, reward, model, a run directory in use, a foreign
    store). Returns the campaign's result: run_id, run_dir, db, final_checkpoint, per-step summaries, evaluations.
    Prefect reports to PREFECT_API_URL when set, else to a temporary server started and stopped here."""
    from mel_app.campaign_commands import preflight
    from mel_app.common import prefect_env
    from mel_core import config as config_mod

    cfg = config if isinstance(config, MelConfig) else load_config(config, overrides)
    preflight(cfg)
    prefect_env(verbose)
    from flows.campaign import campaign
    from mel_app.interrupts import temporary_server

    with temporary_server():
        return campaign(config_mod.to_dict(cfg))


def open_run(run: str | Path, root: str | Path = "runs", limits: ReaderLimits | None = None):
    """A read-only reader of a run's store (mel_core.store.reader.StoreReader: `.query(sql, params)` -> rows as
    dicts, `.query_user_arrow(sql)` -> an Arrow table), bounded by `limits` (default: `mel query`'s) so a heavy
    query never slows the campaign writing the same run. Use it as a context manager."""
    from mel_core.run.refs import resolve_run
    from mel_core.store.reader import StoreReader

    return StoreReader(resolve_run(str(run), root).db, limits=limits or ReaderLimits())
