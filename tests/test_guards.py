"""Guards and bad input, through the real entry points: `mel run`, the campaign flow, the deployment flow."""

import json
from pathlib import Path

import pytest
import torch

from mel_app import cli
from mel_core import config as config_mod
from mel_core.config import ConfigError
from mel_core.model.checkpoints import Checkpoint
from mel_core.model.policy import NonFiniteLoss
from mel_core.problems.sources import MissingDataFile
from mel_core.step.runtime import get_runtime
from mel_core.store.writer import Store
from tests.scripted import scripted_runtimes

B = 8


def _overrides(root, name, *more):
    return [f"run.name={name}", "run.steps=1", f"run.root_dir={root}", f"sampling.prompts_per_step={B}", *more]


def _mel_run(root, name, *more) -> int:
    return cli.main(["run", "--config", "configs/tiny.yaml", *_overrides(root, name, *more)])


@pytest.fixture
def cli_env(monkeypatch):
    """`mel run` sets Prefect's variables for its process; give them back after each test."""
    for var in ("PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_SETTINGS_PATH"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------ bad input to `mel run`


def test_missing_dataset_is_named_before_any_work(tmp_path, capsys, cli_env):
    missing = tmp_path / "nowhere" / "problems.jsonl"
    assert _mel_run(tmp_path / "runs", "missing", f"data.source={missing}") == 2
    assert f"problem file not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no run directory, no DuckDB file, no Prefect run


def test_malformed_jsonl_row_names_its_line(tmp_path, capsys, cli_env):
    bad = tmp_path / "problems.jsonl"
    bad.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n\n" + '{"problem": "2+2", "answer": 4\n')
    assert _mel_run(tmp_path / "runs", "malformed", f"data.source={bad}") == 2
    assert f"{bad}:3: invalid JSON" in capsys.readouterr().err


def test_empty_dataset_is_refused(tmp_path, capsys, cli_env):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _mel_run(tmp_path / "runs", "empty", f"data.source={empty}") == 2
    assert f"{empty}: no problems (the file is empty)" in capsys.readouterr().err


@pytest.mark.parametrize("override, named", [("sampling.group_sise=4", "group_sise"), ("optim.lr=fast", "optim.lr")])
def test_config_typo_or_wrong_type_names_the_key(tmp_path, capsys, cli_env, override, named):
    assert _mel_run(tmp_path / "runs", "typo", override) == 2
    err = capsys.readouterr().err
    assert named in err and f"override '{override}'" in err


def test_deployment_parameters_are_validated_before_any_work():
    from flows.deploy import campaign_from_file

    with pytest.raises(ConfigError, match="run.stepz"):
        campaign_from_file.fn("configs/tiny.yaml", ["run.stepz=1"])


# ---------------------------------------------------------------------------------- the campaign flow


@pytest.mark.slow
def test_missing_dataset_fails_the_flow_before_the_warm_start(prefect_harness, tmp_path):
    from flows.campaign import campaign

    cfg = config_mod.load("configs/tiny.yaml", _overrides(tmp_path, "flow-missing", f"data.source={tmp_path}/x.jsonl"))
    with pytest.raises(MissingDataFile, match="x.jsonl"):
        campaign(config_mod.to_dict(cfg))
    assert Store(tmp_path / "flow-missing" / "mel.duckdb").query("SELECT count(*) AS n FROM stage_runs")[0]["n"] == 0


@pytest.mark.slow
def test_non_finite_update_is_refused_without_checkpoint_or_update_row(prefect_harness, tmp_path, micro_model):
    from flows.campaign import campaign

    # A finite loss stepped with an infinite learning rate gives non-finite weights.
    cfg = config_mod.load("configs/tiny.yaml", _overrides(tmp_path, "nan", "optim.lr=inf",
                                                          f"model.name_or_path={micro_model}"))
    with scripted_runtimes(), pytest.raises(NonFiniteLoss):
        campaign(config_mod.to_dict(cfg))
    s = Store(tmp_path / "nan" / "mel.duckdb")
    updates = s.query("SELECT status, error FROM stage_runs WHERE stage = 'update'")
    assert len(updates) == 1 and updates[0]["status"] == "failed"  # refused once, not retried
    assert updates[0]["error"].startswith("NonFiniteLoss")
    assert s.query("SELECT count(*) AS n FROM updates")[0]["n"] == 0
    assert s.query("SELECT step FROM checkpoints") == [{"step": 0}]  # only the warm start
    assert not list((tmp_path / "nan" / "checkpoints").glob("*/step-*"))  # nor a directory, whole or partial
    # and the process's policy is not left at the refused weights: its next use reloads the checkpoint
    rt = get_runtime(cfg)
    base = s.query("SELECT checkpoint_id, path FROM checkpoints")[0]
    rt.ensure_version(Checkpoint(base["checkpoint_id"], base["path"]))
    assert all(torch.isfinite(p).all() for p in rt.policy.model.parameters())


@pytest.mark.slow
def test_unparsable_analysis_is_rejected_with_its_reason_and_the_step_goes_on(prefect_harness, tmp_path,
                                                                             micro_model):
    from flows.campaign import campaign

    # Three tokens cannot hold a whole analysis: every one is cut off by the length limit (truncated).
    cfg = config_mod.load("configs/tiny.yaml", _overrides(tmp_path, "unparsable", f"model.name_or_path={micro_model}",
                                                          "experience.analysis_max_new_tokens=3"))
    with scripted_runtimes():  # mixed groups, so there are analyses to cut short
        result = campaign(config_mod.to_dict(cfg))
    s = Store(result["db"])
    analyses = s.query("SELECT status, parsed, reject_reason FROM analyses")
    assert analyses, "no mixed group at this step: nothing was analysed"
    assert all(a["status"] == "rejected" and not a["parsed"] and a["reject_reason"] for a in analyses), analyses
    assert {a["reject_reason"] for a in analyses} == {"truncated"}  # cut off by the length limit: never parsed
    assert s.query("SELECT count(*) AS n FROM heuristics")[0]["n"] == 0
    acceptance = s.query("SELECT analyses, unparsed, accepted FROM step_acceptance WHERE step = 1")[0]
    assert acceptance == {"analyses": len(analyses), "unparsed": len(analyses), "accepted": 0}
    assert s.query("SELECT count(*) AS n FROM updates WHERE step = 1")[0]["n"] == 1  # the step went on
    assert Path(result["final_checkpoint"].path).is_dir()


@pytest.mark.slow
def test_mel_run_ends_with_heldout_accuracy_before_and_after(prefect_harness, tmp_path, capsys, cli_env, micro_model):
    """The last lines of `mel run` say whether the campaign learned: greedy Pass@1 at its first and last
    evaluation, per dataset, as the store holds them."""
    script_says_right = lambda q, i: i == 0 and len(q) % 2 == 0  # greedy solves exactly the even-length questions
    from tests.scripted import Script

    with scripted_runtimes(Script(solved=script_says_right)):
        assert _mel_run(tmp_path, "before-after", f"model.name_or_path={micro_model}", "eval.every_n_steps=1",
                        "eval.max_problems=8", "eval.k=0", "eval.datasets=[synthetic]") == 0
    out = capsys.readouterr().out
    rows = Store(tmp_path / "before-after" / "mel.duckdb").query(
        "SELECT step, pass_at_1 FROM heldout_accuracy WHERE dataset = 'synthetic' ORDER BY step")
    assert [r["step"] for r in rows] == [0, 1]
    line = next(x for x in out.splitlines() if x.strip().startswith("synthetic "))
    assert f"{rows[0]['pass_at_1']:.3f} (step 0) -> {rows[1]['pass_at_1']:.3f} (step 1)" in line
    assert "held-out greedy Pass@1, first -> last evaluation:" in out
