"""`orchestration.runner: ray` for real: a 2-worker local Ray cluster and a standalone Prefect server.

`make test-scale` installs the `scale` extra (ray, prefect-ray) and runs this file; without it every
test here is skipped with that reason. The same 2-step MEL campaign (with evaluation) runs twice
against the server, once in one process and once with its generation fanned out to Ray workers, with
the same seeds and one torch thread per process: every record and the final weights must be equal,
and the server must have seen the chunk tasks run by the workers.
"""

import subprocess
import time

import pytest

pytest.importorskip("prefect_ray", reason="prefect-ray not installed: run make test-scale")

import torch
from safetensors.torch import load_file

from mel_core.model.checkpoints import resolve_checkpoint_path
from mel_core.store.writer import Store
from tests.servers import MEL, standalone_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CAMPAIGN = ["run.name=scale", "run.steps=2", "run.torch_threads=1", "sampling.prompts_per_step=8",
            "sampling.chunk_sequences=16",  # 64 rollouts = 4 chunks, so both workers get some
            "eval.every_n_steps=2", "eval.max_problems=8", "eval.k=2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with standalone_server(tmp_path_factory.mktemp("prefect")) as (url, env):
        yield url, env


def _campaign(server, root, runner: str) -> tuple[Store, float]:
    url, env = server
    t0 = time.monotonic()
    done = subprocess.run([*MEL, "run", "--config", "configs/tiny.yaml", *CAMPAIGN, f"run.root_dir={root}",
                           f"orchestration.runner={runner}"], env=dict(env, PREFECT_API_URL=url),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return Store(root / "scale" / "mel.duckdb"), time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    local = _campaign(server, root / "local", "local")
    ray = _campaign(server, root / "ray", "ray")
    return local[0], ray[0]


RECORDS = {
    "rollouts": "SELECT rollout_id, token_ids, text, reward FROM rollouts",
    "pairs": "SELECT pair_id, correct_rollout_id, incorrect_rollout_id FROM pairs",
    "analyses": "SELECT analysis_id, raw_text, token_ids, status, reject_reason FROM analyses",
    "heuristics": "SELECT heuristic_id, text, accepted FROM heuristics",
    "replays": "SELECT replay_id, text, reward FROM replays",
    "updates": "SELECT update_id, checkpoint_out, num_sequences, num_nll_sequences FROM updates",
    "evals": "SELECT eval_id, metric, value, num_problems FROM evals",
}


@pytest.mark.parametrize("table", list(RECORDS))
def test_ray_run_writes_the_records_of_a_single_process_run(runs, table):
    local, ray = runs
    ordered = RECORDS[table] + " ORDER BY 1"
    a, b = local.query(ordered), ray.query(ordered)
    assert a, f"the single-process run wrote no {table}: nothing is compared"
    assert a == b


def test_losses_and_final_weights_match(runs):
    local, ray = runs
    q = "SELECT step, loss, rl_loss, nll_loss FROM updates ORDER BY step"
    for x, y in zip(local.query(q), ray.query(q)):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], abs=1e-6), (x, y)
    paths = [resolve_checkpoint_path(s.query("SELECT path FROM checkpoints ORDER BY step DESC LIMIT 1")[0]["path"],
                                     s.path.parent) for s in runs]
    a, b = (load_file(f"{p}/model.safetensors") for p in paths)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_server_saw_the_workers_chunk_tasks(runs, server):
    """The chunks ran as Prefect task runs that the workers reported to the server, each under the flow run
    of the stage that sent it (only the Ray run makes chunk tasks: the local engine generates in-process)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, _ = server
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        chunk_runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="generate-chunk")), limit=200)
    # per step: 4 rollout chunks, analyses and replays; plus greedy and sampled evaluation at steps 0 and 2
    assert len(chunk_runs) >= 2 * 4 + 2
    assert all(r.state is not None and r.state.is_completed() for r in chunk_runs)
    assert all(r.flow_run_id is not None for r in chunk_runs)
