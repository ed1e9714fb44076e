"""One way to name a run, everywhere: every reader command takes a run as a directory, its .duckdb, a name under
./runs or a run id; with none given, `mel lineage` finds the run that knows the id it is asked about, and a command
that falls back to the newest of several runs says which it chose.

Two runs of one constructed step each (tests/scripted.py) under ./runs of a temporary working directory; the
commands are `mel`'s own (mel_app.cli.main) in this process.
"""

import pytest

from mel_app import cli
from mel_core import config as C
from tests.scripted import Script, run_step, scripted_runtime


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, micro_model):
    root = tmp_path_factory.mktemp("work")
    made = {}
    for name in ("older", "newer"):
        cfg = C.load("configs/tiny.yaml", [f"run.root_dir={root / 'runs'}", f"run.name={name}",
                                           f"model.name_or_path={micro_model}", "sampling.prompts_per_step=4",
                                           "sampling.group_size=4"])
        rt, base = scripted_runtime(cfg, Script())
        run_step(rt, 1, base)
        made[name] = {"run_id": rt.run_id,
                      "heuristic": rt.store.query("SELECT heuristic_id FROM heuristics LIMIT 1")[0]["heuristic_id"],
                      "checkpoint": rt.store.query("SELECT checkpoint_id FROM checkpoints WHERE step = 1")[0]
                      ["checkpoint_id"]}
        rt.store.publish()

    return root, made


@pytest.mark.parametrize("how", ["name", "dir", "file", "id"])
def test_query_and_export_take_a_run_by_name_dir_file_or_id(two_runs, monkeypatch, capsys, how):
    root, made = two_runs
    monkeypatch.chdir(root)
    run = {"name": "older", "dir": "runs/older", "file": "runs/older/mel.duckdb", "id": made["older"]["run_id"]}[how]
    assert cli.main(["query", "--db", run, "--format", "csv", "SELECT DISTINCT run_id FROM runs"]) == 0
    assert made["older"]["run_id"] in capsys.readouterr().out
    assert cli.main(["export", "--db", run, "--out", str(root / f"export-{how}"), "--format", "jsonl"]) == 0
    assert "exported" in capsys.readouterr().out


def test_lineage_without_a_run_finds_the_run_that_knows_the_id(two_runs, monkeypatch, capsys):
    root, made = two_runs
    monkeypatch.chdir(root)
    assert cli.main(["lineage", made["older"]["heuristic"]]) == 0  # in the older run, not the newest
    out = capsys.readouterr().out
    assert f"heuristic {made['older']['heuristic']}" in out and made["older"]["run_id"] in out
    assert cli.main(["lineage", "--checkpoint", made["older"]["checkpoint"]]) == 0
    assert f"checkpoint {made['older']['checkpoint']}" in capsys.readouterr().out


def test_no_run_given_among_several_says_which_it_chose(two_runs, monkeypatch, capsys):
    root, made = two_runs
    monkeypatch.chdir(root)
    assert cli.main(["query", "--format", "csv", "SELECT DISTINCT run_id FROM runs"]) == 0
    captured = capsys.readouterr()
    chosen = "newer" if made["newer"]["run_id"] in captured.out else "older"
    assert f"mel: no run given: using runs/{chosen} (the newest of 2 runs under runs/" in captured.err


def test_a_run_that_is_nowhere_is_one_line(two_runs, monkeypatch, capsys):
    root, _ = two_runs
    monkeypatch.chdir(root)
    assert cli.main(["export", "--db", "nosuch", "--out", str(root / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no store at nosuch: not a run directory" in err[0]
