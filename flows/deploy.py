"""Deployment entry point: a campaign from a config path + overrides (validated before any work)."""

from __future__ import annotations

from prefect import flow

from flows.campaign import campaign
from mel_core import config as config_mod


@flow(name="mel-campaign-from-file")
def campaign_from_file(config_path: str = "configs/tiny.yaml", overrides: list[str] | None = None) -> dict:
    cfg = config_mod.load(config_path, overrides or [])  # a misspelled key fails here, naming it
    return campaign(config_mod.to_dict(cfg))
