"""The Python API (`import mel`): load a config, run a campaign and read its store from a script, as a notebook
would — in a fresh interpreter of its own (Prefect's environment is set by `import mel` before Prefect loads), on the
micro model; and a campaign the API refuses is refused before anything starts, as `mel run` refuses it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import mel
from mel_core.config import ConfigError
from mel_core.errors import PermanentError

SCRIPT = textwrap.dedent("""
    import json, sys
    import mel
    cfg = mel.load_config("configs/tiny.yaml", sys.argv[1:])
    result = mel.run(cfg)
    with mel.open_run("api") as store:   # by name, under ./runs
        n = store.query("SELECT count(*) AS n FROM updates")[0]["n"]
    print("RESULT " + json.dumps({"run_id": result["run_id"], "updates": n, "steps": len(result["steps"])}))
""")


@pytest.mark.slow
def test_a_script_loads_a_config_runs_a_campaign_and_reads_its_store(tmp_path, micro_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", SCRIPT, "run.name=api", "run.steps=2", "run.root_dir=runs",
                           f"model.name_or_path={micro_model}", "sampling.prompts_per_step=4",
                           "sampling.group_size=4", "eval.every_n_steps=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["updates"] == 2 and result["steps"] == 2 and result["run_id"].startswith("run_")
    assert (tmp_path / "runs" / "api" / "mel.duckdb").is_file()  # relative to the script's directory


def test_a_campaign_the_api_refuses_is_refused_before_anything_starts(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(PermanentError, match="nope.jsonl"):
        mel.run("configs/tiny.yaml", [f"data.source={missing}", f"run.root_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()  # no run directory, no store
    with pytest.raises(ConfigError, match="run.stepz"):
        mel.load_config("configs/tiny.yaml", ["run.stepz=1"])
