"""Checkpoint retention (run.keep_checkpoints=2, run.keep_checkpoint_every=2) on real campaigns under Prefect.

One run, three campaign processes' worth of resumes: step 1, then `mel pin` of step 1, then steps 2..5, a fork of
step 5 (which pins it in the parent), then steps 6..7. Expected at the end, by the rules (newest 2, every 2nd step,
pinned ones; optimizer state only for the newest and pinned):

    step 1 pinned (mel pin)   whole        step 5 pinned (fork)   whole
    step 2 every 2nd          weights      step 6 newest 2, 2nd   weights
    step 3 -                  pruned       step 7 newest          whole
    step 4 every 2nd          weights

An unpruned run of the same config (same run id: retention is result-neutral) gives the reference for the resumes:
the pruned run's steps 6 and 7 must equal it bit for bit, weights and AdamW moments. What the policy says is
constructed (tests/scripted.py); the micro model trains for real.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mel_app import cli
from mel_core import config as C
from mel_core.model.checkpoints import OPTIMIZER_FILE, Checkpoint, MissingCheckpoint
from mel_core.run import fork, retention
from mel_core.step.runtime import clear_runtimes, get_runtime
from mel_core.store.reader import StoreReader
from tests.scripted import Script, run_step, scripted_runtime, scripted_runtimes

pytestmark = pytest.mark.slow

STEPS = {1: "whole", 2: "weights", 3: "pruned", 4: "weights", 5: "whole", 6: "weights", 7: "whole"}


def _overrides(root, micro_model, steps: int, keep: bool = True) -> list[str]:
    return ["run.name=keep", f"run.steps={steps}", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
            "sampling.prompts_per_step=4", "sampling.group_size=4", "eval.every_n_steps=0"] + \
        (["run.keep_checkpoints=2", "run.keep_checkpoint_every=2"] if keep else [])


def _campaign(overrides: list[str]) -> dict:
    from flows.campaign import campaign

    with scripted_runtimes():
        return campaign(C.to_dict(C.load("configs/tiny.yaml", overrides)))


def _checkpoints(db: Path, run_id: str) -> dict[int, dict]:
    with StoreReader(db) as reader:
        rows = reader.query("SELECT c.step, c.checkpoint_id, c.path, c.pruned_at FROM checkpoints c "
                            "JOIN updates u ON u.checkpoint_out = c.checkpoint_id WHERE c.run_id = ?", [run_id])
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory, micro_model):
    root = tmp_path_factory.mktemp("runs")
    ref = _campaign(_overrides(tmp_path_factory.mktemp("reference"), micro_model, 7, keep=False))
    first = _campaign(_overrides(root, micro_model, 1))
    run_dir = Path(first["run_dir"])
    pinned_by_hand = cli.main(["pin", f"{run_dir}@1"])
    _campaign(_overrides(root, micro_model, 5))
    # a fork of step 5 registers (and so pins its parent's checkpoint); it need not train for the pin to hold
    point = fork.find_fork_point(f"{run_dir}@5", root)
    clear_runtimes()
    child_rt, _ = scripted_runtime(fork.fork_config("configs/tiny.yaml", _overrides(root, micro_model, 7), point),
                                   Script())
    last = _campaign(_overrides(root, micro_model, 7))
    return root, run_dir, first["run_id"], ref, last, pinned_by_hand, child_rt


def test_exactly_the_expected_checkpoints_remain(runs):
    _, run_dir, run_id, _, last, pinned_by_hand, _ = runs
    assert pinned_by_hand == 0
    rows = _checkpoints(Path(last["db"]), run_id)
    assert sorted(rows) == list(STEPS)
    hashdir = (run_dir / rows[7]["path"]).parent  # <run>/checkpoints/<config hash>/
    assert sorted(p.name for p in hashdir.iterdir()) == [f"step-{s:05d}" for s, kept in STEPS.items()
                                                         if kept != "pruned"]  # no temp or half-deleted directory
    for step, kept in STEPS.items():
        d = hashdir / f"step-{step:05d}"
        assert (rows[step]["pruned_at"] is not None) == (kept == "pruned"), step
        if kept != "pruned":
            assert (d / "model.safetensors").is_file(), step
            assert (d / OPTIMIZER_FILE).is_file() == (kept == "whole"), step
    assert {r["step"] for r in retention.pins(run_dir).values()} == {1, 5}


def test_the_resumed_pruned_run_equals_an_unpruned_one_bit_for_bit(runs):
    _, run_dir, run_id, ref, last, *_ = runs
    ref_rows = _checkpoints(Path(ref["db"]), run_id)  # the same run id: retention does not change a run's identity
    rows = _checkpoints(Path(last["db"]), run_id)
    for step in (6, 7):  # trained after pruning: step 6 from step 5's optimizer state, after a resume
        mine, theirs = run_dir / rows[step]["path"], Path(ref["run_dir"]) / ref_rows[step]["path"]
        a, b = load_file(mine / "model.safetensors"), load_file(theirs / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    ma = torch.load(run_dir / rows[7]["path"] / OPTIMIZER_FILE, weights_only=True)["state"]
    mb = torch.load(Path(ref["run_dir"]) / ref_rows[7]["path"] / OPTIMIZER_FILE, weights_only=True)["state"]
    assert ma and ma.keys() == mb.keys()
    assert all(torch.equal(ma[i][k], mb[i][k]) for i in ma for k in ma[i])  # AdamW moments and step count too


def test_a_fork_pins_its_start_in_the_parent(runs):
    _, run_dir, *_, child_rt = runs
    pin = retention.pins(run_dir)[child_rt.cfg.run.fork.checkpoint_id]
    assert pin["step"] == 5 and "keep-fork5" in pin["by"]
    assert (Path(child_rt.cfg.run.fork.checkpoint_path) / OPTIMIZER_FILE).is_file()  # kept whole though not newest


def test_a_fork_of_a_kept_step_without_optimizer_state_starts_with_fresh_moments(runs, micro_model):
    root, run_dir, *_ = runs
    point = fork.find_fork_point(f"{run_dir}@2", root)
    assert not (Path(point.checkpoint_path) / OPTIMIZER_FILE).exists()
    clear_runtimes()
    rt, start = scripted_runtime(fork.fork_config("configs/tiny.yaml", _overrides(root, micro_model, 3), point),
                                 Script())
    assert len(rt.policy.optimizer.state) == 0  # fresh AdamW moments: the parent kept them for its newest only
    out = run_step(rt, 3, start)
    assert (Path(out["checkpoint"].path) / OPTIMIZER_FILE).is_file() and len(rt.policy.optimizer.state) > 0
    assert point.checkpoint_id in retention.pins(run_dir)


def test_a_fork_of_a_pruned_step_is_refused_in_one_line(runs, micro_model, capsys):
    root, run_dir, *_ = runs
    rc = cli.main(["run", "--config", "configs/tiny.yaml", "--fork", f"{run_dir}@3",
                   *_overrides(root, micro_model, 7)[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "step 3" in err and "pruned" in err and "(0-2, 4-7)" in err  # and which steps can be (the base too)
    assert not (root / "keep-fork3").exists()


def test_verify_eval_and_lineage_say_pruned(runs, capsys):
    _, run_dir, run_id, _, last, *_ = runs
    rows = _checkpoints(Path(last["db"]), run_id)
    assert cli.main(["verify", str(run_dir)]) == 0  # a pruned checkpoint is neither missing nor damaged
    out = capsys.readouterr().out
    assert "pruned by run.keep_checkpoints (weights deleted, records kept): step 3\n" in out
    assert "optimizer state pruned (weights kept): steps 2, 4, 6\n" in out
    assert cli.main(["eval", "--db", str(run_dir), "--checkpoint", rows[3]["checkpoint_id"]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "was pruned" in err
    assert cli.main(["lineage", "--db", str(run_dir), "--checkpoint", rows[7]["checkpoint_id"], "--history"]) == 0
    history = capsys.readouterr().out
    marked = [ln for ln in history.splitlines() if "[pruned" in ln]
    assert len(marked) == 1 and rows[3]["checkpoint_id"] in marked[0]
    assert cli.main(["pin", f"{run_dir}@3"]) == 2 and "pruned" in capsys.readouterr().err


def test_loading_a_pruned_checkpoint_says_pruned(runs, micro_model):
    root, run_dir, run_id, _, last, *_ = runs
    rows = _checkpoints(Path(last["db"]), run_id)
    clear_runtimes()
    rt = get_runtime(C.load("configs/tiny.yaml", _overrides(root, micro_model, 7)))
    with pytest.raises(MissingCheckpoint, match="pruned"):
        rt.locate(Checkpoint(rows[3]["checkpoint_id"], str(run_dir / rows[3]["path"])))
    clear_runtimes()


def _c(cid: str, step: int, pruned=None, optimizer_pruned=False) -> dict:
    return {"checkpoint_id": cid, "step": step, "pruned_at": pruned, "optimizer_pruned": optimizer_pruned}


def test_the_plan():
    six = [_c(f"c{s}", s) for s in range(1, 7)]
    assert retention.plan(six, 0, 2, set()) == retention.Plan((), ())  # 0 keeps everything
    assert retention.plan(six, 2, 0, set()) == retention.Plan(("c1", "c2", "c3", "c4"), ("c5",))
    assert retention.plan(six, 2, 3, {"c1"}) == retention.Plan(("c2", "c4"), ("c3", "c5"))
    # already pruned ones are not counted among the newest; one whose optimizer state is gone is not planned twice
    done = [_c("c1", 1, pruned="t"), _c("c2", 2, optimizer_pruned=True), _c("c3", 3), _c("c4", 4)]
    assert retention.plan(done, 3, 0, set()) == retention.Plan((), ("c3",))


class _Con:
    """A bare DuckDB connection with the readers' `query` (rows as dicts)."""

    def __init__(self, con):
        self.con = con

    def query(self, sql, params=None):
        cur = self.con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]


def test_readers_of_a_store_from_before_retention(tmp_path):
    import duckdb

    from mel_core.store import lineage

    con = duckdb.connect(str(tmp_path / "old.duckdb"))  # the two tables as they were before pruned_at
    con.execute("CREATE TABLE checkpoints (checkpoint_id VARCHAR, run_id VARCHAR, step INTEGER, path VARCHAR, "
                "parent_checkpoint_id VARCHAR, created_at TIMESTAMP)")
    con.execute("CREATE TABLE checkpoint_files (checkpoint_id VARCHAR, file VARCHAR, size BIGINT, digest VARCHAR, "
                "algorithm VARCHAR)")
    con.execute("CREATE TABLE runs (run_id VARCHAR, config_json VARCHAR)")
    con.execute("INSERT INTO checkpoints VALUES ('c1', 'r', 1, 'checkpoints/h/step-00001', NULL, NULL)")
    con.execute("INSERT INTO checkpoint_files VALUES ('c1', 'optimizer.pt', 3, 'd', 'a')")
    store = _Con(con)
    [row] = lineage.checkpoints_with_files(store)
    assert row["pruned_at"] is None and [f.file for f in row["files"]] == ["optimizer.pt"] and not row["pruned_files"]
    assert [f.file for f in lineage.checkpoint_files(store, "c1")] == ["optimizer.pt"]
    assert lineage.find_checkpoint(store, "c1", "/nowhere")["pruned_at"] is None
