"""Deployment entry point: a campaign from a config path + overrides (validated before any work).

`mel deploy` creates the deployment from prefect.yaml; :func:`trigger` starts one of its runs on the
server's work pool and waits for it.
"""

from __future__ import annotations

from prefect import flow

from flows.campaign import campaign
from mel_core import config as config_mod


@flow(name="mel-campaign-from-file")
def campaign_from_file(config_path: str = "configs/tiny.yaml", overrides: list[str] | None = None) -> dict:
    cfg = config_mod.load(config_path, overrides or [])  # a misspelled key fails here, naming it
    return campaign(config_mod.to_dict(cfg))


def trigger(deployment: str, config_path: str, overrides: list[str], timeout_s: float | None):
    """Run `deployment` (its name in prefect.yaml) of this flow with these parameters; the final flow run (state
    included) once it ends, or the still-running one after `timeout_s`. The API is PREFECT_API_URL's."""
    from prefect.deployments import run_deployment

    return run_deployment(f"{campaign_from_file.name}/{deployment}",
                          parameters={"config_path": config_path, "overrides": list(overrides)}, timeout=timeout_s)
