"""The Prefect UI shows a campaign: `mel serve` (a standalone server + worker), a 2-step scripted campaign sent
to it, then a headless Chromium (Debian's package, no driver: `--dump-dom` for the rendered text, `--screenshot`
for the picture) on the runs list, the campaign and step flow runs, a task run and the campaign's artifacts.

Only under `make test-ui` (it installs Chromium and sets MEL_UI_TEST=1); screenshots go to $MEL_UI_SCREENSHOTS
(make test-ui: runs/ui-screenshots/), else into the test's temporary directory.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mel_app import serve
from tests.servers import mel_serve

pytestmark = [pytest.mark.ui, pytest.mark.slow]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000", "--virtual-time-budget=20000"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`mel serve` on a free port with its own Prefect state; yields (UI base URL, API URL)."""
    with mel_serve(tmp_path_factory.mktemp("prefect")) as (port, _, _):
        yield f"http://127.0.0.1:{port}", serve.api_url("127.0.0.1", port)


@pytest.fixture(scope="module")
def campaign(served, tmp_path_factory, micro_model):
    """A 2-step campaign (scripted engine: mixed groups, accepted heuristics) sent to the served API; returns
    what the UI should show: flow runs, task runs and artifacts by name/key."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _, api = served
    root = tmp_path_factory.mktemp("runs")
    done = subprocess.run([sys.executable, "-m", "tests.scripted_campaign", "run", "--config", "configs/tiny.yaml",
                           "run.name=ui", "run.steps=2", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
                           "sampling.prompts_per_step=4", "sampling.group_size=4", "eval.every_n_steps=1",
                           "eval.max_problems=8", "eval.k=2"], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PREFECT_API_URL=api))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        runs = {(flows[r.flow_id], r.name): r for r in client.read_flow_runs()}
        tasks = client.read_task_runs()
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    return {"runs": runs, "tasks": tasks, "artifacts": artifacts, "run_dir": root / "ui"}


def _chromium(*args: str, profile: Path) -> str:
    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH: make test-ui installs Debian's package"
    out = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _page(served, path: str, name: str, tmp_path) -> str:
    """The page's rendered text (tags stripped), and its screenshot as <name>.png."""
    import re

    shots = Path(os.environ.get("MEL_UI_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    url = served[0] + path
    dom = _chromium("--dump-dom", url, profile=tmp_path / f"profile-{name}-dom")
    _chromium(f"--screenshot={shots / (name + '.png')}", url, profile=tmp_path / f"profile-{name}-shot")
    assert (shots / f"{name}.png").stat().st_size > 10_000  # a rendered page, not a blank one
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def _one(runs, flow: str, name: str | None = None):
    found = [r for (f, n), r in runs.items() if f == flow and (name is None or n == name)]
    assert len(found) == 1, (flow, name, list(runs))
    return found[0]


def test_the_runs_list_shows_the_campaign_its_steps_and_evaluations(served, campaign, tmp_path):
    text = _page(served, "/runs", "runs", tmp_path)
    assert "Can't connect to Server API" not in text  # the UI calls this server's API, not :4200's
    for flow, name in campaign["runs"]:
        assert flow in text and name in text
    assert text.count("Completed") >= len(campaign["runs"])


def test_the_campaign_and_a_step_flow_run_render(served, campaign, tmp_path):
    top = _one(campaign["runs"], "mel-campaign")
    text = _page(served, f"/runs/flow-run/{top.id}", "campaign-flow-run", tmp_path)
    assert f"{top.name} Completed" in text and "Flow mel-campaign" in text and "Subflow Runs" in text
    step = _one(campaign["runs"], "mel-iteration", "ui/step-1")
    text = _page(served, f"/runs/flow-run/{step.id}", "step-1-flow-run", tmp_path)
    assert "step-1 Completed" in text and "7 Task runs" in text and f"Parent Run {top.name}" in text


def test_a_stage_task_run_renders(served, campaign, tmp_path):
    step = _one(campaign["runs"], "mel-iteration", "ui/step-2")
    (update,) = [t for t in campaign["tasks"] if t.flow_run_id == step.id and t.name.startswith("update")]
    text = _page(served, f"/runs/task-run/{update.id}", "update-task-run", tmp_path)
    assert update.name in text and "Completed" in text and "step-2" in text


def test_the_artifacts_render(served, campaign, tmp_path):
    arts = campaign["artifacts"]
    text = _page(served, f"/artifacts/artifact/{arts['mel-ui-campaign-summary'].latest_id}", "campaign-summary", tmp_path)
    assert "Held-out accuracy dataset metric base last change synthetic" in text and "Acceptance" in text
    text = _page(served, f"/artifacts/artifact/{arts['mel-ui-report'].latest_id}", "report-link", tmp_path)
    assert str(campaign["run_dir"] / "report" / "report.md") in text
    text = _page(served, f"/artifacts/artifact/{arts['mel-ui-step-summary'].latest_id}", "step-summary", tmp_path)
    assert "Step 2 of ui" in text and "reward_mean" in text
    text = _page(served, f"/artifacts/artifact/{arts['mel-ui-heuristic-library'].latest_id}", "heuristic-library", tmp_path)
    assert "representative" in text and "If" in text
