"""`mel export` on a constructed run: one step, two mixed groups, one analysis accepted and one rejected.

The files load in pyarrow and in `datasets` (offline), hold what the store holds row for row, carry each
row's lineage (run, step, policy version; for analyses and heuristics the pair, both rollouts and the
checkpoint that internalized them), and --accepted-only keeps exactly the accepted material. Bad input is one
line, exit 2, and writes nothing.
"""

import json
import re

import pyarrow.parquet as pq
import pytest

from mel_core import config as C
from mel_core.atomic_files import write_file_atomically
from mel_core.store.export import READS
from mel_core.store.reader import StoreReader
from mel_core.store.writer import release_connections
from tests.scripted import Script, run_step, scripted_runtime
from tests.test_hostile import mel, one_line


def first_question_replays_right():
    """A replay verifies only for the first question it is asked about: one analysis accepted, one rejected."""
    first = []

    def solves(question: str) -> bool:
        first[:] = first or [question]
        return question == first[0]
    return solves


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model):
    root = tmp_path_factory.mktemp("export")
    cfg = C.load("configs/tiny.yaml", ["run.name=exported", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
                                       "sampling.prompts_per_step=2", "sampling.group_size=4"])
    rt, base = scripted_runtime(cfg, Script(replay_solves=first_question_replays_right()))
    run_step(rt, 1, base)
    rt.store.publish()  # the stage functions called directly: publish as the campaign's bookkeeping does
    release_connections()
    return rt.run_dir, rt.run_id, base.checkpoint_id


def read(run_dir, sql, params=None) -> list[dict]:
    with StoreReader(run_dir) as r:
        return r.query(sql, params)


def by_id(table, key) -> dict:
    return {row[key]: row for row in table.to_pylist()}


def test_the_situation_has_one_accepted_and_one_rejected_analysis(run):
    run_dir, _, _ = run
    statuses = sorted(r["status"] for r in read(run_dir, "SELECT status FROM analyses"))
    assert statuses == ["accepted", "rejected"]


def test_parquet_files_hold_every_row_with_its_lineage(run, tmp_path):
    run_dir, run_id, base = run
    rc, out, err = mel("export", "--db", run_dir, "--out", tmp_path / "x")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted(f"{t}.parquet" for t in READS)  # no temps
    counts = {t: read(run_dir, f"SELECT count(*) AS n FROM {v}")[0]["n"] for t, v in
              [("rollouts", "rollouts"), ("analyses", "analyses"), ("heuristics", "heuristics"),
               ("lineage", "heuristic_lineage")]}
    tables = {t: pq.read_table(tmp_path / "x" / f"{t}.parquet") for t in READS}
    assert {t: tables[t].num_rows for t in READS} == counts and counts["rollouts"] == 8
    for t in READS:  # what it says it wrote
        assert re.search(rf"^  {t}\s+{counts[t]} rows  {tmp_path / 'x' / t}.parquet$", out, re.MULTILINE), out
    for t in ("rollouts", "analyses", "heuristics"):  # every row: its run, step and policy version
        rows = tables[t].select(["run_id", "step", "policy_version_id"]).to_pylist()
        assert rows and all(r == {"run_id": run_id, "step": 1, "policy_version_id": base} for r in rows), t
    # the rollouts keep their token ids and the prompt they answered
    stored = {r["rollout_id"]: r for r in read(run_dir, "SELECT r.rollout_id, r.token_ids, p.prompt_text FROM rollouts "
                                                        "r JOIN prompts p USING (prompt_id)")}
    exported = by_id(tables["rollouts"], "rollout_id")
    assert {k: (v["token_ids"], v["prompt_text"]) for k, v in exported.items()} == \
        {k: (v["token_ids"], v["prompt_text"]) for k, v in stored.items()}
    # heuristics and analyses: the ids up the chain, and the checkpoint that internalized the accepted ones
    chain = {r["heuristic_id"]: r for r in read(
        run_dir, "SELECT heuristic_id, analysis_id, pair_id, prompt_id, correct_rollout_id, incorrect_rollout_id, "
                 "accepted, internalized_in_checkpoint FROM heuristic_lineage")}
    step_checkpoint = read(run_dir, "SELECT checkpoint_out FROM updates WHERE step = 1")[0]["checkpoint_out"]
    heuristics = by_id(tables["heuristics"], "heuristic_id")
    assert heuristics.keys() == chain.keys()
    for hid, h in heuristics.items():
        for col in ("analysis_id", "pair_id", "prompt_id", "correct_rollout_id", "incorrect_rollout_id", "accepted"):
            assert h[col] == chain[hid][col], col
        assert h["internalized_in_checkpoint"] == (step_checkpoint if h["accepted"] else None)
    analyses = by_id(tables["analyses"], "analysis_id")
    for a in analyses.values():
        assert a["internalized_in_checkpoint"] == (step_checkpoint if a["status"] == "accepted" else None)
        assert a["correct_rollout_id"] in exported and a["incorrect_rollout_id"] in exported
    lineage = tables["lineage"]
    assert set(lineage.column_names) >= {"heuristic", "correct_text", "incorrect_text", "question",
                                         "internalized_in_checkpoint", "policy_version_id", "run_id"}


def test_datasets_loads_every_file_offline(run, tmp_path, monkeypatch):
    run_dir, _, _ = run
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # read at import: also if imported before
    assert mel("export", "--db", run_dir, "--out", tmp_path / "x")[0] == 0
    assert mel("export", "--db", run_dir, "--out", tmp_path / "j", "--format", "jsonl")[0] == 0
    for table in READS:
        expected = pq.read_table(tmp_path / "x" / f"{table}.parquet")
        files = (("parquet", tmp_path / "x" / f"{table}.parquet"), ("json", tmp_path / "j" / f"{table}.jsonl"))
        for kind, path in files:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
            assert ds.num_rows == expected.num_rows > 0, (table, kind)
            assert ds.column_names == expected.column_names, (table, kind)
            assert ds[0]["run_id"] == expected["run_id"][0].as_py()


def test_jsonl_is_one_whole_object_per_row(run, tmp_path):
    run_dir, _, _ = run
    rc, out, err = mel("export", "--db", run_dir, "--out", tmp_path, "--format", "jsonl", "--what", "analyses")
    assert rc == 0 and str(tmp_path / "analyses.jsonl") in out, err
    assert [p.name for p in tmp_path.iterdir()] == ["analyses.jsonl"]
    lines = (tmp_path / "analyses.jsonl").read_text().splitlines()
    stored = {r["analysis_id"]: r for r in read(
        run_dir, "SELECT analysis_id, raw_text, trained_token_ids, trained_parts FROM analyses")}
    assert len(lines) == len(stored) == 2
    for line in lines:
        row = json.loads(line)
        s = stored[row["analysis_id"]]
        assert (row["raw_text"], row["trained_token_ids"], row["trained_parts"]) == \
            (s["raw_text"], s["trained_token_ids"], s["trained_parts"])


def test_accepted_only_keeps_the_accepted_material_and_its_pairs_rollouts(run, tmp_path):
    run_dir, _, _ = run
    rc, _, err = mel("export", "--db", run_dir, "--out", tmp_path, "--accepted-only")
    assert rc == 0, err
    t = {name: pq.read_table(tmp_path / f"{name}.parquet").to_pylist() for name in READS}
    accepted = read(run_dir, "SELECT a.analysis_id, pa.correct_rollout_id, pa.incorrect_rollout_id FROM analyses a "
                             "JOIN pairs pa USING (pair_id) WHERE a.status = 'accepted'")
    assert len(accepted) == 1
    assert [a["analysis_id"] for a in t["analyses"]] == [accepted[0]["analysis_id"]]
    assert {r["rollout_id"] for r in t["rollouts"]} == {accepted[0]["correct_rollout_id"],
                                                         accepted[0]["incorrect_rollout_id"]}
    accepted_h = {r["heuristic_id"] for r in read(run_dir, "SELECT heuristic_id FROM heuristics WHERE accepted")}
    assert accepted_h and {h["heuristic_id"] for h in t["heuristics"]} == accepted_h
    assert {h["heuristic_id"] for h in t["lineage"]} == accepted_h


def test_an_export_replaces_the_earlier_files_whole(run, tmp_path):
    run_dir, _, _ = run
    assert mel("export", "--db", run_dir, "--out", tmp_path, "--what", "rollouts")[0] == 0
    assert pq.read_table(tmp_path / "rollouts.parquet").num_rows == 8
    assert mel("export", "--db", run_dir, "--out", tmp_path, "--what", "rollouts", "--accepted-only")[0] == 0
    assert pq.read_table(tmp_path / "rollouts.parquet").num_rows == 2
    assert [p.name for p in tmp_path.iterdir()] == ["rollouts.parquet"]  # no temp left beside it


@pytest.mark.parametrize("argv, says", [
    (["--what", "rollouts,prompts"], "unknown table 'prompts'"),
    (["--format", "csv"], "--format 'csv': expected one of parquet, jsonl"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, argv, says):
    run_dir, _, _ = run
    rc, out, err = mel("export", "--db", run_dir, "--out", tmp_path / "x", *argv)
    assert rc == 2 and out == "" and says in one_line(err), err
    assert not (tmp_path / "x").exists()


def test_an_out_that_is_a_file_or_a_missing_store_is_one_line(run, tmp_path):
    run_dir, _, _ = run
    (tmp_path / "taken").write_text("mine")
    rc, _, err = mel("export", "--db", run_dir, "--out", tmp_path / "taken")
    assert rc == 2 and "is a file" in one_line(err)
    assert (tmp_path / "taken").read_text() == "mine"
    rc, _, err = mel("export", "--db", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert rc == 2 and "no store at" in one_line(err) and not (tmp_path / "x").exists()


def test_a_write_that_fails_midway_leaves_the_earlier_file_and_no_temp(tmp_path):
    path = tmp_path / "rollouts.parquet"
    path.write_text("the earlier export")

    def disk_full(tmp):
        tmp.write_text("half of a file")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        write_file_atomically(path, disk_full)
    assert path.read_text() == "the earlier export" and list(tmp_path.iterdir()) == [path]
