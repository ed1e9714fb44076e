"""Runs can be copied and moved: the store records a checkpoint by its path relative to the run directory, and every
reader resolves a recorded path against where the store is now (mel_core.model.checkpoints.resolve_checkpoint_path).

As it was reported: a `cp -a` copy of a run, extended, read the ORIGINAL's checkpoints (from its store's absolute
paths and from Prefect's cached task results); with the original moved away it failed with a hub error retried as
transient; `--fork MOVED@3` was refused though the files were there; `mel eval --checkpoint MOVED/...` fell back to
configs/tiny.yaml for a model trained with another config. Real campaigns (`mel run` in this process, its Prefect
flows and cached tasks) on the micro model.
"""

import os
import shutil
from pathlib import Path

import duckdb
import pytest

from mel_app import cli
from mel_core.errors import is_transient
from mel_core.model.checkpoints import (
    MissingCheckpoint,
    portable_path,
    require_checkpoint_dir,
    resolve_checkpoint_path,
)
from mel_core.model.policy import local_or_hub
from mel_core.step.runtime import clear_runtimes
from mel_core.store.writer import Store

NAME = "orig"


# ------------------------------------------------------------------------------------------- the one function


def test_recorded_paths_resolve_against_where_the_run_is_now(tmp_path):
    run, other = tmp_path / "now" / NAME, tmp_path / "then" / NAME
    step = run / "checkpoints" / "abc" / "step-00002"
    step.mkdir(parents=True)
    assert portable_path(step, run) == "checkpoints/abc/step-00002"  # what a run records
    assert portable_path("/models/base", run) == "/models/base" and portable_path("org/model", run) == "org/model"
    assert resolve_checkpoint_path("checkpoints/abc/step-00002", run) == step
    # an older store's absolute path of another directory: this run's own copy when it has one
    assert resolve_checkpoint_path(other / "checkpoints" / "abc" / "step-00002", run) == step
    assert resolve_checkpoint_path(other / "checkpoints" / "abc" / "step-00009", run) == \
        other / "checkpoints" / "abc" / "step-00009"  # not here: as it is (the caller says it is missing)
    assert resolve_checkpoint_path("org/model", run) == Path("org/model")  # a base model's hub name
    with pytest.raises(MissingCheckpoint) as e:
        require_checkpoint_dir("ckpt_x", other / "checkpoints" / "abc" / "step-00009", run)
    assert str(run) in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not is_transient(e.value)


def test_a_missing_local_model_directory_is_never_a_hub_lookup(tmp_path):
    for missing in (tmp_path / "gone" / "checkpoints" / "h" / "step-00008", "./gone-model", "~/gone-model"):
        with pytest.raises(MissingCheckpoint) as e:
            local_or_hub(missing)
        assert "never looked up on the Hugging Face hub" in str(e.value) and not is_transient(e.value)
    assert local_or_hub("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


# ------------------------------------------------------------------------------------- copied, moved, extended


def _mel(*argv) -> int:
    clear_runtimes()  # each `mel` is a process of its own: its policy loads checkpoints from disk
    return cli.main([str(a) for a in argv])


def _run(root, micro_model, steps: int, *more) -> int:
    return _mel("run", "--config", "configs/tiny.yaml", f"run.name={NAME}", f"run.steps={steps}", f"run.root_dir={root}",
                f"model.name_or_path={micro_model}", "sampling.prompts_per_step=4", "sampling.group_size=2",
                "eval.every_n_steps=0", "eval.max_problems=2", "eval.k=0", *more)


def _checkpoints(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in Store(run_dir / "mel.duckdb").query(
        "SELECT step, checkpoint_id, path FROM checkpoints ORDER BY step")}


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        data = f.read(4096)
        f.seek(path.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH", raising=False)


@pytest.mark.slow
def test_a_copied_run_reads_its_own_checkpoints_and_a_moved_one_extends_evaluates_and_forks(
        prefect_harness, tmp_path, capsys, cli_env, micro_model):
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    original = first / NAME
    assert _run(first, micro_model, 2) == 0
    written = _checkpoints(original)
    assert written[1]["path"].startswith("checkpoints/") and written[2]["path"].startswith("checkpoints/")

    copy = second / NAME
    shutil.copytree(original, copy, symlinks=True)  # its store, its checkpoints, Prefect's cached results
    # As a store written before paths were relative would have them: absolute, naming the original's directory.
    con = duckdb.connect(str(copy / "mel.duckdb"))
    con.execute("UPDATE checkpoints SET path = ? || '/' || path WHERE path LIKE 'checkpoints/%'", [str(original)])
    con.close()
    (copy / "mel.snapshot.duckdb").unlink(missing_ok=True)
    # The original's step-2 weights damaged: reading them would be refused (DamagedCheckpoint), training on them wrong.
    _flip(original / written[2]["path"] / "model.safetensors")

    capsys.readouterr()
    assert _run(second, micro_model, 3) == 0, capsys.readouterr()  # steps 1-2 cached, step 3 from ITS step 2
    mine = _checkpoints(copy)
    assert (copy / mine[3]["path"] / "model.safetensors").is_file() and not mine[3]["path"].startswith("/")
    assert not (original / Path(mine[3]["path"])).exists()  # nothing written into the original
    assert Store(copy / "mel.duckdb").query("SELECT checkpoint_in FROM updates WHERE step = 3") == \
        [{"checkpoint_in": written[2]["checkpoint_id"]}]

    # Moved: the copy renamed away, the old directory gone; extend, evaluate, fork.
    os.rename(second, third)
    moved = third / NAME
    capsys.readouterr()
    assert _run(third, micro_model, 4) == 0, capsys.readouterr()
    mine = _checkpoints(moved)
    step4 = moved / mine[4]["path"]
    assert step4.is_dir() and str(step4).startswith(str(third))

    capsys.readouterr()
    assert _mel("eval", "--checkpoint", step4, "--datasets", "synthetic", "eval.k=0", "eval.max_problems=2") == 0
    out = capsys.readouterr().out
    assert f"mel: config: the run's own, from {moved / 'mel.duckdb'}" in out, out
    evals = Store(moved / "mel.duckdb").query("SELECT DISTINCT run_id, checkpoint_id FROM evals")
    assert {e["checkpoint_id"] for e in evals} == {mine[4]["checkpoint_id"]}
    # another model's config is refused in one line, before anything is loaded or written
    assert _mel("eval", "--checkpoint", step4, "--config", "configs/tiny.yaml", "--datasets", "synthetic") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.name_or_path" in err[0] and "leave out --config" in err[0], err

    assert _mel("run", "--config", "configs/tiny.yaml", "--fork", f"{moved}@3", f"run.name={NAME}",
                f"run.root_dir={third}",
                f"model.name_or_path={micro_model}", "run.steps=4", "sampling.prompts_per_step=4",
                "sampling.group_size=2", "eval.every_n_steps=0", "eval.k=0", "eval.max_problems=2",
                "loss.nll_coef=0.5") == 0, capsys.readouterr()
    fork = _checkpoints(third / f"{NAME}-fork3")
    assert fork[3]["checkpoint_id"] == mine[3]["checkpoint_id"] and Path(fork[3]["path"]).is_relative_to(moved)
    assert (third / f"{NAME}-fork3" / fork[4]["path"] / "model.safetensors").is_file()

    # An old checkpoint pruned: a finished step is walked past (only the checkpoint a step starts from is loaded).
    shutil.rmtree(moved / mine[2]["path"])
    assert _run(third, micro_model, 5) == 0, capsys.readouterr()
    mine = _checkpoints(moved)
    step5 = moved / mine[5]["path"]

    # The checkpoint a step starts from is nowhere: one line naming the run directory, exit 2, not retried, no hub.
    shutil.rmtree(step5)
    capsys.readouterr()
    assert _run(third, micro_model, 6) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"mel: checkpoint {mine[5]['checkpoint_id']}: no directory at {step5} "
                           f"(run directory {moved})"), last
    assert "hub" not in last.lower()
    failed = Store(moved / "mel.duckdb").query("SELECT stage, step, error FROM stage_runs WHERE status = 'failed'")
    assert [(f["stage"], f["step"]) for f in failed] == [("sample", 6)], failed  # refused once, never retried
    assert failed[0]["error"].startswith("MissingCheckpoint")
    assert not (step5.parent / "step-00006").exists()
