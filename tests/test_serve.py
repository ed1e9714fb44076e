"""`mel serve` + `mel deploy --run`: a standalone Prefect server and a process worker (Prefect state in a
temporary PREFECT_HOME), prefect.yaml's campaign deployed to it, and a one-step campaign run by the
worker to COMPLETED."""

import os
import subprocess

import pytest

from mel_app import serve
from mel_core.store.writer import Store
from tests.servers import MEL, free_port, wait_for

pytestmark = pytest.mark.slow



def test_serve_deploy_and_run_a_campaign(tmp_path, micro_model):
    port = free_port()
    url = serve.api_url("127.0.0.1", port)
    # The worker looks for new flow runs every 2 s instead of 10.
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_WORKER_QUERY_SECONDS="2")
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "serve.log"
    server = subprocess.Popen([*MEL, "serve", "--port", str(port), "--limit", "1"], env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(log, "mel: ready", server, 240)
        assert (tmp_path / "prefect" / "prefect.db").exists()  # state under PREFECT_HOME, not $HOME

        # a misspelled override fails before anything reaches the server
        typo = subprocess.run([*MEL, "deploy", "--api-url", url, "--run", "run.stepz=1"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert typo.returncode == 2 and "run.stepz" in typo.stderr

        # run.root_dir left relative: the run lands under the directory `mel deploy --run` ran in, not in the
        # checkout the worker's flow run starts in
        user = tmp_path / "user"
        user.mkdir()
        small = ["run.steps=1", f"model.name_or_path={micro_model}", "sampling.prompts_per_step=4",
                 "sampling.group_size=4", "eval.every_n_steps=0", f"run.cache_dir={tmp_path / 'cache'}"]
        done = subprocess.run([*MEL, "deploy", "--api-url", url, "--run", "--timeout", "600", "run.name=served",
                               *small], env=env, cwd=user, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()[-3000:]
        assert "COMPLETED" in done.stdout
        s = Store(user / "runs" / "served" / "mel.duckdb")
        assert s.query("SELECT count(*) AS n FROM updates WHERE step = 1")[0]["n"] == 1
        assert not (serve.REPO / "runs" / "served").exists()

        # a failed stage: its task run and error line on the terminal, and where the whole log is
        failed = subprocess.run([*MEL, "deploy", "--api-url", url, "--run", "--timeout", "600", "run.name=broken",
                                 "orchestration.faults=[{stage: update, step: 1, when: before, kind: permanent}]",
                                 *small], env=env, cwd=user, capture_output=True, text=True, timeout=900)
        assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout + failed.stderr
        assert "mel: failed: task run update" in failed.stderr and "injected" in failed.stderr.lower(), failed.stderr
        assert "prefect flow-run logs" in failed.stderr

        limit = subprocess.run([serve.prefect_cli(), "work-pool", "inspect", serve.POOL], capture_output=True,
                               text=True, env=dict(env, PREFECT_API_URL=url))
        assert "concurrency_limit=1," in limit.stdout  # --limit 1: one flow run at a time on this host
    finally:
        serve.stop(server)
    assert server.returncode == 0 and not serve.healthy(url)  # stopped cleanly, server and worker gone
