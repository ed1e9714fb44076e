import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Prefect state under the repo, never in $HOME; telemetry off. Set before prefect is imported.
os.environ.setdefault("PREFECT_HOME", str(REPO / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
os.chdir(REPO)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server/database for the whole session (it takes ~8 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
