"""`mel runs` over a root of constructed run directories, one per status, through the real bookkeeping.

finished: a whole step executed stage by stage (`executions.execute`, as the tasks do) with run.steps=1, plus
an evaluation; failed: an injected permanent fault in verify; interrupted: a stage left `running` (what a
killed process leaves) and a stage stopped by Ctrl-C; running: the run lock held by this test process. Also:
the parent of a forked run (a store with `runs.parent_run_id`), a foreign file named without stopping the
listing, bad roots in one line, and the status rules one by one on hand-written executions.
"""

import hashlib

import duckdb
import pytest

from mel_core import config as C
from mel_core.ids import make_id, now
from mel_core.run import executions, lock
from mel_core.run.listing import run_status
from mel_core.step import stages
from mel_core.store.writer import release_connections
from tests.scripted import Script, scripted_runtime
from tests.test_hostile import mel, one_line

COLUMNS = ["name", "run id", "status", "steps", "last checkpoint", "held-out pass@1", "parent"]


def make_run(root, micro_model, name, *overrides):
    cfg = C.load("configs/tiny.yaml", [f"run.name={name}", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
                                       "sampling.prompts_per_step=2", "sampling.group_size=4", *overrides])
    return scripted_runtime(cfg, Script())


def execute_step(rt, step, ckpt) -> dict:
    """One step with every stage's execution recorded in stage_runs, as tasks.common.run_stage records it."""
    for stage in ("sample", "verify", "pair", "diagnose", "abstract", "replay"):
        extra = () if stage in ("verify", "pair") else (ckpt,)
        executions.execute(rt, stage, step, getattr(stages, stage), step, *extra)
    out = executions.execute(rt, "update", step, stages.update, step, ckpt)
    rt.settle_saves()  # run.async_save: the update's rows commit once its checkpoint is written
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory, micro_model):
    root = tmp_path_factory.mktemp("runs")
    ids = {}

    rt, base = make_run(root, micro_model, "done", "run.steps=1")
    update = execute_step(rt, 1, base)
    ckpt = rt.store.query("SELECT checkpoint_out FROM updates WHERE step = 1")[0]["checkpoint_out"]
    rt.store.insert("evals", [{"eval_id": make_id("eval", ckpt), "run_id": rt.run_id, "checkpoint_id": ckpt, "step": 1,
                               "dataset": "synthetic", "metric": "pass@1", "k": 1, "temperature": 0.0, "value": 0.5,
                               "num_problems": 4, "created_at": now()}])
    rt.store.publish()
    ids["done"] = (rt.run_id, ckpt, update)

    rt, base = make_run(root, micro_model, "broken", "run.steps=2",
                        "orchestration.faults=[{stage: verify, step: 1, when: before, kind: permanent}]")
    executions.execute(rt, "sample", 1, stages.sample, 1, base)
    with pytest.raises(Exception, match="injected permanent fault"):
        executions.execute(rt, "verify", 1, stages.verify, 1)
    ids["broken"] = (rt.run_id, base.checkpoint_id)

    rt, base = make_run(root, micro_model, "killed", "run.steps=2")
    executions.execute(rt, "sample", 1, stages.sample, 1, base)
    # what execute writes before a stage body; the process is then killed, so nothing closes the row
    rt.store.insert("stage_runs", [{"stage_run_id": "killed-verify", "run_id": rt.run_id, "step": 1, "stage": "verify",
                                    "started_at": now(), "status": "running"}])
    rt.store.publish()
    ids["killed"] = (rt.run_id,)

    rt, base = make_run(root, micro_model, "stopped", "run.steps=2")

    def ctrl_c(rt, step, ckpt):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        executions.execute(rt, "sample", 1, ctrl_c, 1, base)
    ids["stopped"] = (rt.run_id,)

    rt, base = make_run(root, micro_model, "live", "run.steps=2")
    with rt.store.transaction() as w:  # recorded as a fork of the finished run (mel run --fork sets the column)
        w.execute("UPDATE runs SET parent_run_id = ?", [ids["done"][0]])
    rt.store.publish()
    ids["live"] = (rt.run_id,)

    (root / "foreign").mkdir()
    con = duckdb.connect(str(root / "foreign" / "mel.duckdb"))
    con.execute("CREATE TABLE sales (id INT)")
    con.close()
    release_connections()
    return root, ids


def listing(root) -> tuple[dict[str, dict], str]:
    """`mel runs --root ROOT` as {name: {column: cell}}, and its stderr."""
    rc, out, err = mel("runs", "--root", root)
    assert rc == 0, err
    lines = out.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == COLUMNS
    rows = [dict(zip(COLUMNS, (c.strip() for c in ln.split(" | ")))) for ln in lines[2:-1]]
    return {r["name"]: r for r in rows}, err


def test_each_run_has_its_status_steps_checkpoint_accuracy_and_parent(root):
    root, ids = root
    rows, err = listing(root)
    assert set(rows) == {"done", "broken", "killed", "stopped", "live", "foreign"}
    assert {n: r["status"] for n, r in rows.items()} == {
        "done": "finished", "broken": "failed", "killed": "interrupted", "stopped": "interrupted",
        "live": "interrupted", "foreign": "unreadable"}
    done_id, done_ckpt, _ = ids["done"]
    assert rows["done"] == {"name": "done", "run id": done_id, "status": "finished", "steps": "1/1",
                            "last checkpoint": f"{done_ckpt} (step 1)", "held-out pass@1": "synthetic 0.500 @1",
                            "parent": "-"}
    assert rows["broken"]["steps"] == "0/2" and rows["broken"]["last checkpoint"] == f"{ids['broken'][1]} (step 0)"
    assert rows["broken"]["held-out pass@1"] == "-"
    assert rows["live"]["parent"] == done_id and rows["killed"]["parent"] == "-"
    others = ("killed", "stopped", "live")
    assert [rows[n]["run id"] for n in others] == [ids[n][0] for n in others]
    line = one_line(err)  # the foreign file is named; the listing went on
    assert str(root / "foreign") in line and "not a mel store" in line


def test_a_held_run_lock_is_running(root):
    root, _ = root
    with lock.run_lock(root / "live", log=lambda s: None):
        assert listing(root)[0]["live"]["status"] == "running"
        assert listing(root)[0]["broken"]["status"] == "failed"  # only the held directory
    assert listing(root)[0]["live"]["status"] == "interrupted"


def test_a_directory_held_before_its_store_exists_is_running(tmp_path):
    with lock.run_lock(tmp_path / "warming", log=lambda s: None):
        rows, _ = listing(tmp_path)
    assert rows["warming"]["status"] == "running" and rows["warming"]["run id"] == "-"


def test_listing_reads_only(root):
    root, _ = root
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == ".duckdb")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    listing(root)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == before
    assert sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == ".duckdb") == files


def test_a_missing_root_is_one_line_and_an_empty_one_says_so(tmp_path):
    rc, out, err = mel("runs", "--root", tmp_path / "nowhere")
    assert rc == 2 and out == "" and "no such directory" in one_line(err)
    rc, out, err = mel("runs", "--root", tmp_path)
    assert rc == 0 and out == f"mel: no runs under {tmp_path}/\n"


def ex(status, stage="sample", step=1, error=None) -> dict:
    return {"status": status, "stage": stage, "step": step, "error": error}


@pytest.mark.parametrize("held, executions, planned, updated, expected", [
    (True, [ex("failed")], 2, [], "running"),                                   # the lock wins
    (False, [ex("completed"), ex("running")], 2, [], "interrupted"),            # its process died
    (False, [ex("interrupted"), ex("completed", "update", 2)], 2, [1, 2], "finished"),  # resumed, then finished
    (False, [ex("failed", error="KeyboardInterrupt: ")], 2, [], "interrupted"),  # Ctrl-C
    (False, [ex("failed", error="InjectedPermanentFault: x")], 2, [], "failed"),
    (False, [ex("failed"), ex("completed", "update", 2)], 2, [1, 2], "finished"),  # retried, then finished
    (False, [ex("completed", "update", 1)], 2, [1], "interrupted"),             # stopped before its last step
    (False, [], 1, [1], "finished"),                                            # stages run without bookkeeping
    (False, [ex("completed", "update", 1)], None, [1], "interrupted"),          # no readable run.steps
])
def test_status_rules(held, executions, planned, updated, expected):
    assert run_status(held, executions, planned, updated) == expected
