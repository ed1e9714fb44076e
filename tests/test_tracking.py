"""logging.report_to: the config checks, what is logged, and the three trackers for real — TensorBoard and MLflow
read back through their own readers, W&B's offline run files parsed — across a resume that must not log a step
twice. The campaign's own wiring is tested in tests/test_campaign_e2e.py."""

import sys
from pathlib import Path

import pytest

from mel_core import config as C
from mel_core import vocabulary
from mel_core.study import tracking
from mel_core.study.summary import acceptance, base_and_last, campaign_markdown
from tests import wandb_files

RUN_ID = "run_0123456789abcdef"


def _steps(*steps):
    return [{"step": s, "reward_mean": s / 10, "accepted": s, "candidates": 2 * s, "retention_ratio": 0.5,
             "stage_seconds": {"sample": 1.0 + s, "update": 2.0}} for s in steps]


def _eval(step, value):
    return {"dataset": "synthetic", "step": step, "metrics": {"pass@1": value, "avg@2": value / 2},
            "num_problems": 8, "seconds": 0.1}


# ------------------------------------------------------------------------------------------------ config


def test_report_to_defaults_to_none_and_is_result_neutral():
    plain = C.load("configs/tiny.yaml")
    tracked = C.load("configs/tiny.yaml", ["logging.report_to=[tensorboard,mlflow,wandb]"])
    assert plain.logging.report_to == []
    assert tracked.logging.report_to == ["tensorboard", "mlflow", "wandb"]
    # turning a tracker on keeps the run id: the campaign resumes and backfills instead of starting over
    assert C.config_hash(plain) == C.config_hash(tracked)


@pytest.mark.parametrize("value, message", [
    ("[tensorboard,neptune]", "logging.report_to[1]': unknown tracker 'neptune'; one of tensorboard, mlflow, wandb"),
    ("[mlflow,mlflow]", "logging.report_to[1]': mlflow is listed twice"),
])
def test_a_bad_tracker_is_one_line_naming_the_key(value, message):
    with pytest.raises(C.ConfigError) as e:
        C.load("configs/tiny.yaml", [f"logging.report_to={value}"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_package_names_the_key_and_the_pip_install(monkeypatch):
    real = vocabulary.importlib.util.find_spec
    monkeypatch.setattr(vocabulary.importlib.util, "find_spec", lambda m: None if m == "mlflow" else real(m))
    with pytest.raises(C.ConfigError) as e:
        C.load("configs/tiny.yaml", ["logging.report_to=[mlflow]"])
    assert str(e.value) == ("override 'logging.report_to=[mlflow]': config key 'logging.report_to': mlflow needs "
                            "the package mlflow-skinny: pip install mlflow-skinny (or pip install -e '.[tracking]')")


def test_an_import_that_fails_when_the_tracker_opens_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(vocabulary.importlib.util, "find_spec", lambda m: None)
    settings = C.LoggingConfig(report_to=["wandb"])
    with pytest.raises(C.ConfigError, match=r"'logging.report_to': wandb needs the package wandb: pip install wandb"):
        tracking.Tracking(settings, RUN_ID, tmp_path)


# ------------------------------------------------------------------------------------------ what is logged


def test_step_and_eval_scalars():
    assert tracking.step_scalars(_steps(2)[0]) == {
        "train/reward_mean": 0.2, "train/accepted": 2.0, "train/candidates": 4.0, "train/retention_ratio": 0.5,
        "time/sample": 3.0, "time/update": 2.0}
    assert tracking.step_scalars({"step": 1, "retention_ratio": None, "stage_seconds": {}}) == {}
    assert tracking.eval_scalars(_eval(0, 0.5)) == {"eval/synthetic/pass@1": 0.5, "eval/synthetic/avg@2": 0.25}
    assert tracking.mlflow_key("eval/synthetic/pass@1") == "eval/synthetic/pass_at_1"
    assert tracking.mlflow_key("eval/aime 24?/x") == "eval/aime 24_/x"
    assert tracking.flat_config({"run": {"name": "a", "steps": 2}, "eval": {"datasets": ["synthetic"]}, "e": {}}) == {
        "run.name": '"a"', "run.steps": "2", "eval.datasets": '["synthetic"]', "e": "{}"}


def test_campaign_summary_compares_base_and_last_evaluation():
    evals = [_eval(0, 0.25), _eval(1, 0.5), _eval(2, 0.375)]
    rows = base_and_last(evals)
    assert [(r["metric"], r["base_step"], r["base"], r["last_step"], r["last"]) for r in rows] == [
        ("avg@2", 0, 0.125, 2, 0.1875), ("pass@1", 0, 0.25, 2, 0.375)]
    assert acceptance(_steps(1, 2) + [{"step": 3}]) == (3, 6)
    md = campaign_markdown("demo", RUN_ID, _steps(1, 2), evals)
    assert "| synthetic | pass@1 | 0.250 (step 0) | 0.375 (step 2) | +0.125 |" in md
    assert "| 3 | 6 | 0.50 |" in md
    assert "No evaluation in this campaign" in campaign_markdown("demo", RUN_ID, [], [])


# ---------------------------------------------------------------------------------------- the trackers


def _run_twice(root: Path, report_to: list[str]) -> tracking.Tracking:
    """A campaign of 2 steps that dies after logging them, resumed to 3 steps: the resumed process walks
    steps 1-2 again (cache hits) before step 3, as flows/campaign.py does."""
    settings = C.LoggingConfig(report_to=report_to)
    first = tracking.Tracking(settings, RUN_ID, root)
    first.log_config({"run": {"name": "demo", "steps": 2}})
    first.log_evals([_eval(0, 0.25)])
    for s in _steps(1, 2):
        first.log_step(s)
    first.log_evals([_eval(2, 0.5)])
    first.close(ok=False)

    second = tracking.Tracking(settings, RUN_ID, root)
    second.log_config({"run": {"name": "demo", "steps": 3}})
    second.log_evals([_eval(0, 0.25)])
    for s in _steps(1, 2, 3):
        second.log_step(s)
    second.log_evals([_eval(3, 0.625)])
    second.close(ok=True)
    return second


def test_tensorboard_holds_each_step_once_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run_twice(tmp_path, ["tensorboard"])
    logdir = tmp_path / "tracking" / "tensorboard" / RUN_ID
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one event file per process, one run
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    scalars = lambda tag: [(e.step, round(e.value, 6)) for e in ea.Scalars(tag)]
    assert scalars("train/reward_mean") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert scalars("time/sample") == [(1, 2.0), (2, 3.0), (3, 4.0)]
    assert scalars("eval/synthetic/pass@1") == [(0, 0.25), (2, 0.5), (3, 0.625)]
    config = ea.Tensors("config/text_summary")  # add_text: logged once (the ledger), by the first process
    assert len(config) == 1 and b'"steps": 2' in config[0].tensor_proto.string_val[0]


def test_mlflow_continues_the_same_run_across_a_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    _run_twice(tmp_path, ["mlflow"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mel").experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [(RUN_ID, "FINISHED")]
    run_id = runs[0].info.run_id
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
    assert sorted(history("train/reward_mean")) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert sorted(history("eval/synthetic/pass_at_1")) == [(0, 0.25), (2, 0.5), (3, 0.625)]
    assert runs[0].data.params["run.steps"] == "2"  # the config, logged once
    artifacts = tmp_path / "tracking" / "mlflow-artifacts"
    assert list(artifacts.glob("*/artifacts/config.json"))  # beside the store, not in ./mlruns
    assert not Path("mlruns").exists()


def test_wandb_offline_files_hold_the_metrics_once(tmp_path):
    import wandb

    _run_twice(tmp_path, ["wandb"])
    wandb.teardown()  # run.finish() can return before W&B's writer process has written the file's last records
    # one directory per process, under one W&B run id (`wandb sync` joins them); W&B adds "-1" to a directory
    # name that another process took in the same second
    files = list((tmp_path / "tracking" / "wandb").glob(f"offline-run-*-{RUN_ID}*/run-{RUN_ID}.wandb"))
    assert len(files) == 2
    rows = sorted((r for f in files for r in wandb_files.history(f)), key=lambda r: r["_step"])
    trained = [(r["_step"], r["train/reward_mean"]) for r in rows if "train/reward_mean" in r]
    assert trained == [(1, 0.1), (2, 0.2), (3, 0.3)]
    evals = [(r["_step"], r["eval/synthetic/pass@1"]) for r in rows if "eval/synthetic/pass@1" in r]
    assert evals == [(0, 0.25), (2, 0.5), (3, 0.625)]
    configs = [wandb_files.config(f).get("run") for f in files]
    assert sorted(configs, key=str) == [None, {"name": "demo", "steps": 2}]  # logged once, by the first process


def test_a_failing_tracker_is_left_out_and_backfilled_by_the_next_run(tmp_path, monkeypatch):
    calls = []

    class Flaky:
        broken = True

        def __init__(self, settings, run_id, root):
            pass

        def log_config(self, config):
            pass

        def log_scalars(self, step, scalars):
            if Flaky.broken and step == 2:
                raise ConnectionError("tracking server went away")
            calls.append(step)

        def flush(self):
            pass

        def close(self, ok):
            pass

    monkeypatch.setitem(tracking.OPENERS, "mlflow", Flaky)
    settings = C.LoggingConfig(report_to=["mlflow"])
    t = tracking.Tracking(settings, RUN_ID, tmp_path)
    for s in _steps(1, 2, 3):
        t.log_step(s)  # step 2 fails: the tracker is dropped, the campaign goes on
    t.close()
    assert calls == [1]
    Flaky.broken = False
    t = tracking.Tracking(settings, RUN_ID, tmp_path)
    for s in _steps(1, 2, 3):
        t.log_step(s)
    t.close()
    assert calls == [1, 2, 3]  # the ledger had step 1 only
