"""The experiment trackers of ``logging.report_to`` and the package each needs: a leaf (the config validates
against it; mel_core.tracking runs them). Nothing is imported here."""

from __future__ import annotations

import importlib.util

# tracker -> (the module it imports, the pip package that provides it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
TRACKERS = tuple(PACKAGES)


def missing_package(tracker: str) -> str | None:
    """Why `tracker` cannot run here (its package is not installed), or None; the package is not imported."""
    module, package = PACKAGES[tracker]
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{tracker} needs the package {package}: pip install {package} (or pip install -e '.[tracking]')"
