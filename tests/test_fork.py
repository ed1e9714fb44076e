"""Forking a campaign: a 3-step parent run (constructed steps: mixed groups, parseable analyses, replays that
solve, so every step internalizes heuristics), forked at step 2 with another λ and learning rate.

The fork starts from the parent's step-2 checkpoint and optimizer state, numbers its one step 3, writes its own
store without the parent's steps, and still answers lineage questions about the parent's step-1 heuristics from
its own last checkpoint.
"""

import os
from pathlib import Path

import pytest

from mel_app import cli
from mel_core import config as C
from mel_core.run import fork
from mel_core.store import lineage
from mel_core.store.reader import StoreReader
from mel_core.store.schema import VIEWS
from tests.scripted import Script, run_step, scripted_runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parent(tmp_path_factory, micro_model):
    root = tmp_path_factory.mktemp("runs")
    overrides = ["run.name=parent", "run.steps=3", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
                 "sampling.prompts_per_step=4", "sampling.group_size=2"]
    rt, ckpt = scripted_runtime(C.load("configs/tiny.yaml", overrides), Script())
    checkpoints = {0: ckpt.checkpoint_id}
    for step in (1, 2, 3):
        out = run_step(rt, step, ckpt)
        ckpt = out["checkpoint"]
        checkpoints[step] = ckpt.checkpoint_id
    rt.store.publish()  # a fork reads its parent's published snapshot
    return overrides, rt, checkpoints


@pytest.fixture(scope="module")
def child(parent):
    overrides, prt, _ = parent
    point = fork.find_fork_point("parent@2", prt.cfg.run.root_dir)
    cfg = fork.fork_config("configs/tiny.yaml", overrides + ["loss.nll_coef=0.5", "optim.lr=1e-5"], point)
    rt, start = scripted_runtime(cfg, Script())
    optimizer = rt.policy.optimizer
    before_training = (optimizer.param_groups[0]["lr"], len(optimizer.state))
    out = run_step(rt, 3, start)
    rt.store.publish()
    return rt, start, out, before_training


def _parent_heuristics(prt, checkpoint_id) -> set[str]:
    return {h["heuristic_id"] for h in lineage.checkpoint_heuristics(prt.store, checkpoint_id)}


def test_the_fork_records_its_parent_and_starts_from_its_checkpoint(parent, child):
    _, prt, checkpoints = parent
    rt, start, out, (lr, moments) = child
    assert rt.cfg.run.name == "parent-fork2" and rt.run_dir != prt.run_dir  # its own store, never the parent's
    assert rt.run_id != prt.run_id and rt.config_hash != prt.config_hash
    run = rt.store.query("SELECT * FROM runs WHERE run_id = ?", [rt.run_id])[0]
    assert (run["parent_run_id"], run["parent_step"], run["parent_checkpoint_id"], run["copied_from"]) == \
        (prt.run_id, 2, checkpoints[2], None)
    assert start.checkpoint_id == checkpoints[2]
    # its start is the parent's own row (run, step 2), and its first checkpoint names it as parent
    assert lineage.checkpoint(rt.store, checkpoints[2])["run_id"] == prt.run_id
    own = rt.store.query("SELECT step, parent_checkpoint_id FROM checkpoints WHERE run_id = ?", [rt.run_id])
    assert own == [{"step": 3, "parent_checkpoint_id": checkpoints[2]}]
    assert out["checkpoint"].checkpoint_id not in checkpoints.values()
    # the parent's optimizer moments continue, at the fork's own learning rate
    assert lr == 1e-5 and moments > 0


def test_fork_steps_continue_the_parents_numbering(parent, child):
    _, prt, _ = parent
    rt, *_ = child
    assert [r["step"] for r in rt.store.query("SELECT step FROM steps WHERE run_id = ?", [rt.run_id])] == [3]
    order = "SELECT problem_id FROM prompts WHERE run_id = ? AND step = 3 ORDER BY position"
    # step 3 of the fork draws the problems its parent's step 3 drew: a counterfactual of that step
    assert rt.store.query(order, [rt.run_id]) == prt.store.query(order, [prt.run_id])


def test_mel_runs_counts_a_forks_own_steps(parent, child):
    """A fork at step 2 of a 3-step config plans one step of its own: `mel runs` says 1/1, not 1/3."""
    from mel_core.run.listing import summarize_store
    from mel_core.store.reader import StoreReader

    rt, *_ = child
    with StoreReader(rt.run_dir) as reader:
        (line,) = [r for r in summarize_store(reader, lock_held=False) if r.run_id == rt.run_id]
    assert line.steps == "1/1" and line.status == "finished" and line.parent == parent[1].run_id


def test_the_parents_steps_are_not_copied(parent, child):
    _, prt, checkpoints = parent
    rt, *_ = child
    for table in ("steps", "metrics", "replays", "stage_runs", "library_clusters"):
        assert rt.store.query(f"SELECT count(*) AS n FROM {table} WHERE run_id = ?", [prt.run_id])[0]["n"] == 0, table
    learned = _parent_heuristics(prt, checkpoints[1]) | _parent_heuristics(prt, checkpoints[2])
    analyses = prt.store.query("SELECT count(DISTINCT analysis_id) AS n FROM heuristics WHERE list_contains(?, "
                               "heuristic_id)", [sorted(learned)])[0]["n"]
    copied = rt.store.query("SELECT count(*) AS n FROM rollouts WHERE run_id = ?", [prt.run_id])[0]["n"]
    assert analyses > 0 and copied == 2 * analyses  # the two rollouts of each internalized pair, nothing else
    assert rt.store.query("SELECT count(*) AS n FROM rollouts WHERE run_id = ? AND step = 3", [prt.run_id])[0]["n"] == 0
    assert rt.store.query("SELECT copied_from FROM runs WHERE run_id = ?", [prt.run_id])[0]["copied_from"] == \
        str(prt.store.path.resolve())
    assert {r["run_id"] for r in rt.store.query("SELECT run_id FROM step_acceptance")} == {rt.run_id}


def test_a_step_1_heuristic_is_on_the_history_of_the_forks_last_checkpoint(parent, child, capsys):
    _, prt, checkpoints = parent
    rt, _, out, _ = child
    last = out["checkpoint"].checkpoint_id
    chain = lineage.checkpoint_chain(rt.store, last)
    assert [(c["step"], c["run_id"]) for c in chain] == \
        [(0, prt.run_id), (1, prt.run_id), (2, prt.run_id), (3, rt.run_id)]

    step1 = _parent_heuristics(prt, checkpoints[1])
    hid = sorted(step1)[0]
    history = lineage.checkpoint_history_heuristics(rt.store, last)
    by_id = {h["heuristic_id"]: h for h in history}
    assert step1 | _parent_heuristics(prt, checkpoints[2]) <= set(by_id)
    assert (by_id[hid]["internalized_in_checkpoint"], by_id[hid]["heuristic_run_id"], by_id[hid]["heuristic_step"]) == \
        (checkpoints[1], prt.run_id, 1)
    assert not _parent_heuristics(prt, checkpoints[3]) & set(by_id)  # the parent's step 3 is not the fork's past
    assert {h["heuristic_run_id"] for h in history if h["update_step"] == 3} == {rt.run_id}
    view = rt.store.query("SELECT heuristic_id FROM checkpoint_history_heuristics WHERE checkpoint_id = ?", [last])
    assert {r["heuristic_id"] for r in view} == set(by_id)  # the view and the reader's inline SQL agree

    row = lineage.heuristic_lineage(rt.store, hid)  # complete, from the fork's own file
    assert row["run_name"] == "parent" and row["internalized_in_checkpoint"] == checkpoints[1]
    for col in ("analysis_id", "pair_id", "correct_text", "incorrect_text", "question", "answer", "policy_version_id"):
        assert row[col] is not None, col

    assert cli.main(["lineage", "--db", str(rt.run_dir), "--checkpoint", last, "--history"]) == 0
    printed = capsys.readouterr().out
    assert hid in printed and "run parent (" in printed and "run parent-fork2 (" in printed


def test_the_history_reads_a_store_written_before_the_views_existed(child, tmp_path):
    """Readers run the history's SQL inline: an older snapshot without the checkpoint_history views answers too."""
    import shutil

    import duckdb

    rt, _, out, _ = child
    older = tmp_path / "mel.duckdb"
    shutil.copy(rt.store.path, older)
    con = duckdb.connect(str(older))
    for view in ("checkpoint_history_heuristics", "checkpoint_history"):
        con.execute(f"DROP VIEW {view}")
    con.close()
    with StoreReader(older) as reader:
        assert "checkpoint_history" in VIEWS and not reader.query(
            "SELECT 1 FROM duckdb_views() WHERE view_name = 'checkpoint_history'")
        assert lineage.checkpoint_history_heuristics(reader, out["checkpoint"].checkpoint_id) == \
            lineage.checkpoint_history_heuristics(rt.store, out["checkpoint"].checkpoint_id)


def test_a_fork_is_refused_in_one_line(parent, capsys):
    overrides, prt, _ = parent
    root = prt.cfg.run.root_dir
    before = sorted(os.listdir(root))
    cases = (("parent@7", [], "run parent (" + prt.run_id + ") has no checkpoint at step 7; it has checkpoints at "
                                                            "steps 0-3"),
             ("parent", [], "expected RUN@STEP"),
             ("nope@1", [], "no run 'nope'"),
             ("parent@2", ["run.steps=2"], "config key 'run.steps'"),
             ("parent@2", ["model.lora.enabled=true"], "keeps its model: model.lora.enabled"))
    for spec, more, says in cases:
        assert cli.main(["run", "--config", "configs/tiny.yaml", "--fork", spec, *overrides, *more]) == 2, spec
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(root)) == before  # nothing was created


def test_a_fork_without_any_change_is_still_a_run_of_its_own(parent):
    overrides, prt, checkpoints = parent
    point = fork.find_fork_point(str(prt.run_dir) + "@1", prt.cfg.run.root_dir)  # by directory this time
    assert (point.run_id, point.checkpoint_id) == (prt.run_id, checkpoints[1])
    cfg = fork.fork_config("configs/tiny.yaml", overrides, point)
    assert fork.config_changes(point.config, C.to_dict(cfg)) == []
    assert C.config_hash(cfg) != prt.config_hash  # the fork point is identity: another run id, checkpoints, cache


def test_a_fork_is_named_after_its_parent_not_its_config_file(parent):
    """The config file's run.name names the file's own run (the demo's, in the default layout): a fork without a
    run.name= override is <parent>-fork<step>, never that directory."""
    overrides, prt, _ = parent
    point = fork.find_fork_point("parent@1", prt.cfg.run.root_dir)
    cfg = fork.fork_config("configs/tiny.yaml", [o for o in overrides if not o.startswith("run.name=")], point)
    assert cfg.run.name == "parent-fork1"
    named = fork.fork_config("configs/tiny.yaml", overrides + ["run.name=elsewhere"], point)
    assert named.run.name == "elsewhere"


def test_a_fork_never_writes_into_another_runs_directory(parent, child, capsys):
    overrides, prt, _ = parent
    rt, *_ = child
    root = Path(prt.cfg.run.root_dir)
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("someone else's")
    before = {p: sorted(os.listdir(root / p)) for p in os.listdir(root)}
    # a named directory that exists; the fork's default name, already the run of another fork (another λ)
    for more, where in ((["run.name=taken"], root / "taken"), (["loss.nll_coef=0.25"], rt.run_dir)):
        assert cli.main(["run", "--config", "configs/tiny.yaml", "--fork", "parent@2", *overrides, *more]) == 2
        err = capsys.readouterr().err
        assert f"run directory {where} already exists and holds another run" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert {p: sorted(os.listdir(root / p)) for p in os.listdir(root)} == before  # nothing was created or written
    # the fork's own directory is no refusal: the same command again resumes it
    point = fork.find_fork_point("parent@2", root)
    again = fork.fork_config("configs/tiny.yaml", overrides + ["loss.nll_coef=0.5", "optim.lr=1e-5"], point)
    assert again.run.name == rt.cfg.run.name and C.config_hash(again) == rt.config_hash


def test_a_damaged_checkpoint_refuses_the_fork_before_it_registers(parent, capsys):
    """A truncated weights file is found from the digests the parent recorded: one line, exit 2, no run directory,
    no registered run (the fork's run never shows as `interrupted 0/1`)."""
    overrides, prt, _ = parent
    root = prt.cfg.run.root_dir
    (ckpt,) = [c for c in lineage.run_checkpoints(prt.store, prt.run_id) if c["step"] == 1]
    weights = next(p for p in (os.path.join(ckpt["path"], f) for f in os.listdir(ckpt["path"]))
                   if p.endswith(".safetensors"))
    kept = open(weights, "rb").read()
    before = sorted(os.listdir(root))
    try:
        with open(weights, "wb") as f:
            f.write(kept[: len(kept) // 2])
        assert cli.main(["run", "--config", "configs/tiny.yaml", "--fork", "parent@1", *overrides]) == 2
    finally:
        with open(weights, "wb") as f:
            f.write(kept)
    err = capsys.readouterr().err
    assert "--fork parent@1:" in err and "is damaged" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(root)) == before and "parent-fork1" not in before
