"""Data a user has: Parquet and Arrow files and folders, nested fields, chat-style records, a held-out split of one
file, and missing-field errors that name the config key to set. The files are written here with pyarrow and
datasets, the libraries the loader reads them with."""

import json

import pytest

from mel_core import config as config_mod
from mel_core.config import DataConfig
from mel_core.problems import sources as D

ROWS = [{"id": f"r{i}", "extra_info": {"question": f"What is {i}+{i}?", "level": i % 3},
         "reward_model": {"ground_truth": str(2 * i)}} for i in range(1, 8)]
NESTED = D.Fields(question="extra_info.question", answer="reward_model.ground_truth", id="id")


def _expected(source):
    return [(f"{source}:r{i}", f"What is {i}+{i}?", str(2 * i)) for i in range(1, 8)]


def _seen(problems):
    return [(p.problem_id, p.question, p.answer) for p in problems]


def test_parquet_file_and_folder_load_with_nested_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "bench.parquet")
    problems = D.load_file(tmp_path / "bench.parquet", NESTED)
    assert _seen(problems) == _expected("bench")
    assert problems[0].row == ROWS[0]  # the whole row, nested fields included (what a reward plug-in gets)
    assert json.loads(problems[0].row_json) == ROWS[0]
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:4]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[4:]), folder / "part-1.parquet")
    assert _seen(D.load_file(folder, NESTED)) == _expected("shards")
    # without ids, a table's problems are numbered by row
    assert [p.problem_id for p in D.load_file(folder, D.Fields("extra_info.question", "reward_model.ground_truth"))] \
        == [f"shards:{i}" for i in range(1, 8)]


def test_datasets_save_to_disk_folders_and_arrow_files_load(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert _seen(D.load_file(tmp_path / "saved", NESTED)) == _expected("saved")
    # a DatasetDict: its train split
    datasets.DatasetDict({"train": ds.select(range(5)), "test": ds.select(range(5, 7))}).save_to_disk(
        str(tmp_path / "splits"))
    assert _seen(D.load_file(tmp_path / "splits", NESTED)) == _expected("splits")[:5]
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(D.DataError, match="none named 'train'"):
        D.load_file(tmp_path / "nosplit", NESTED)
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert _seen(D.load_file(arrow, NESTED, source="b")) == _expected("b")


def test_a_folder_that_is_no_dataset_is_one_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no Parquet files"):
        D.load_file(tmp_path / "empty")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(D.DataError, match="cannot read it as a table") as e:
        D.load_file(tmp_path / "bad.parquet")
    assert len(str(e.value).splitlines()) == 1


def test_chat_style_messages_records(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                          {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                          {"role": "user", "content": "2+3?"}], "answer": 5},
            # DAPO-Math-17k's shape: the prompt a chat list, the answer nested
            {"prompt": [{"role": "user", "content": "3+4?"}], "reward_model": {"ground_truth": "7"}}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert [(p.question, p.answer) for p in D.load_file(path)] == [("1+1?", "2"), ("2+3?", "5")]
    dapo = tmp_path / "dapo.jsonl"
    dapo.write_text(json.dumps(rows[2]) + "\n")
    fields = D.Fields(question="problem", answer="reward_model.ground_truth", messages="prompt")
    assert [(p.question, p.answer) for p in D.load_file(dapo, fields)] == [("3+4?", "7")]
    no_answer = tmp_path / "open.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(D.DataError, match="no assistant message.*set data.answer_field"):
        D.load_file(no_answer)


@pytest.mark.parametrize("row, key", [({"question": "q", "answer": 1}, "data.question_field"),
                                      ({"problem": "q", "solution": 1}, "data.answer_field"),
                                      ({"problem": "q", "answer": 1}, "data.id_field")])
def test_a_missing_field_names_the_config_key_to_set(tmp_path, row, key):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(D.DataError) as e:
        D.load_file(path, D.Fields(id="uid" if key == "data.id_field" else ""))
    message = str(e.value)
    assert message.startswith(f"{path}:1: missing field ") and f"set {key} to the field" in message, message
    assert str(sorted(row)) in message and len(message.splitlines()) == 1


def test_held_out_split_of_one_file_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "many.jsonl"
    rows = [{"problem": f"q{i}", "answer": i} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(path), eval_fraction=0.1)
    train, held = D.load_problems(cfg, "train"), D.load_problems(cfg, "eval")
    assert len(held) == 20 and len(train) == 180
    assert {p.problem_id for p in train}.isdisjoint({p.problem_id for p in held})
    assert {p.problem_id for p in train} | {p.problem_id for p in held} == {f"many:{i}" for i in range(1, 201)}
    assert D.load_problems(cfg, "eval") == held and D.load_problems(cfg, "train") == train  # again: the same
    # independent of row order: the same rows shuffled (ids by an id field) hold out the same problems
    by_id = [{"problem": f"q{i}", "answer": i, "uid": i} for i in range(200)]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shuffled, ordered = tmp_path / "a" / "bench.jsonl", tmp_path / "b" / "bench.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in by_id[::-1]))
    ordered.write_text("".join(json.dumps(r) + "\n" for r in by_id))
    held_ids = [{p.problem_id for p in D.load_problems(
        DataConfig(source=str(f), id_field="uid", eval_fraction=0.1), "eval")} for f in (shuffled, ordered)]
    assert held_ids[0] == held_ids[1] and len(held_ids[0]) == 20
    # data.eval_source: another file as the held-out split; without either there is none
    other = tmp_path / "val.jsonl"
    other.write_text(json.dumps({"problem": "v", "answer": 1}) + "\n")
    assert [p.question for p in D.load_problems(DataConfig(source=str(path), eval_source=str(other)), "eval")] == ["v"]
    assert len(D.load_problems(DataConfig(source=str(path), eval_source=str(other)), "train")) == 200
    with pytest.raises(D.DataError, match="set data.eval_fraction"):
        D.load_problems(DataConfig(source=str(path)), "eval")


def test_eval_split_keys_are_validated_and_leave_old_hashes_alone():
    with pytest.raises(config_mod.ConfigError, match="not both"):
        config_mod.load("configs/tiny.yaml", ["data.eval_fraction=0.1", "data.eval_source=x.jsonl"])
    with pytest.raises(config_mod.ConfigError, match="data.eval_fraction"):
        config_mod.load("configs/tiny.yaml", ["data.eval_fraction=1.0"])
    # the hashes main computed before data.messages_field, data.eval_fraction, data.eval_source and verify.reward
    # existed: unset, they leave run ids (and caches) as they were
    before = {"configs/tiny.yaml": "b522a03f4138f1c3", "configs/qwen3-4b-base.yaml": "d90ec0709897b8fd"}
    for path, digest in before.items():
        assert config_mod.config_hash(config_mod.load(path)) == digest, path
    for override in ("data.eval_fraction=0.1", "data.eval_source=v.jsonl", "data.messages_field=prompt",
                     "verify.reward=my_rewards:exact"):
        assert config_mod.config_hash(config_mod.load("configs/tiny.yaml", [override])) != before["configs/tiny.yaml"]
