import pytest

from mel_core.ids import make_id
from mel_core.store.database import ReadOnlyViolation
from mel_core.store.query_output import format_table
from mel_core.store.reader import StoreReader, check_read_only
from mel_core.store.writer import Store, release_connections


def test_ids_are_deterministic():
    assert make_id("r", "run", 1, 2) == make_id("r", "run", 1, 2)
    assert make_id("r", "run", 1, 2) != make_id("r", "run", 2, 1)


def test_insert_twice_is_noop_and_update_sets_columns(tmp_path):
    s = Store(tmp_path / "m.duckdb")
    row = {"rollout_id": "a", "text": "x", "token_ids": [1, 2], "reward": None}
    s.insert("rollouts", [row])
    s.insert("rollouts", [row])
    s.update("rollouts", "rollout_id", [{"rollout_id": "a", "reward": 1.0}])
    rows = s.query("SELECT * FROM rollouts")
    assert len(rows) == 1 and rows[0]["reward"] == 1.0 and rows[0]["token_ids"] == [1, 2]


def test_transaction_rolls_back_on_error(tmp_path):
    s = Store(tmp_path / "m.duckdb")
    with pytest.raises(RuntimeError):
        with s.transaction() as w:
            w.insert("pairs", [{"pair_id": "p1"}])
            raise RuntimeError("crash mid-write")
    assert s.counts()["pairs"] == 0


def test_epoch_is_stable_per_file(tmp_path):
    a = Store(tmp_path / "m.duckdb").epoch
    assert Store(tmp_path / "m.duckdb").epoch == a
    assert Store(tmp_path / "other.duckdb").epoch != a


def test_read_only_queries_refuse_writes(tmp_path):
    s = Store(tmp_path / "m.duckdb")
    for sql in ["DELETE FROM runs", "DROP TABLE runs", "CREATE TABLE x (a INT)", "INSERT INTO meta VALUES ('a','b')",
                "SELECT 1; DELETE FROM runs", "ATTACH 'x.db'", "COPY runs TO 'x.csv'"]:
        with pytest.raises(ReadOnlyViolation):
            check_read_only(sql)
    with StoreReader(s.path) as reader:
        cols, rows = reader.query_user("SELECT key FROM meta ORDER BY key")
    assert cols == ["key"] and [r[0] for r in rows] == ["epoch", "format", "schema_version"]
    assert "(3 rows)" in format_table(cols, rows)


def test_reader_waits_for_writer_in_another_process(tmp_path):
    import subprocess
    import sys
    import time

    s = Store(tmp_path / "m.duckdb")
    release_connections()  # this process's own idle connection would otherwise keep the other one out
    holder = subprocess.Popen([sys.executable, "-c", (
        "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
        "time.sleep(1.0); c.close()"), str(s.path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    assert s.query("SELECT count(*) AS n FROM runs")[0]["n"] == 0  # waited for the lock instead of failing
    assert time.monotonic() - t0 > 0.3
    holder.wait(5)


def test_lineage_view_joins_the_chain(tmp_path):
    s = Store(tmp_path / "m.duckdb")
    with s.transaction() as w:
        w.insert("runs", [{"run_id": "run1", "name": "n"}])
        w.insert("prompts", [{"prompt_id": "p1", "run_id": "run1", "question": "1+2", "answer": "3"}])
        w.insert("rollouts", [{"rollout_id": "good", "prompt_id": "p1", "text": "ok"},
                              {"rollout_id": "bad", "prompt_id": "p1", "text": "no"}])
        w.insert("pairs", [{"pair_id": "pa", "run_id": "run1", "prompt_id": "p1", "correct_rollout_id": "good",
                            "incorrect_rollout_id": "bad"}])
        w.insert("analyses", [{"analysis_id": "a1", "pair_id": "pa", "run_id": "run1", "policy_version_id": "v0",
                               "status": "accepted"}])
        w.insert("heuristics", [{"heuristic_id": "h1", "analysis_id": "a1", "run_id": "run1", "step": 1,
                                 "text": "If x, then y.", "accepted": True}])
        w.insert("updates", [{"update_id": "u1", "run_id": "run1", "step": 1, "checkpoint_out": "v1"}])
        w.insert("internalized", [{"update_id": "u1", "analysis_id": "a1", "heuristic_id": "h1"}])
    r = s.query("SELECT * FROM heuristic_lineage WHERE heuristic_id = 'h1'")[0]
    assert (r["correct_text"], r["incorrect_text"], r["question"], r["internalized_in_checkpoint"]) == ("ok", "no", "1+2", "v1")


def test_opening_an_older_file_adds_new_columns(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")  # a store of an older mel
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("CREATE TABLE analyses (analysis_id VARCHAR PRIMARY KEY, pair_id VARCHAR, status VARCHAR)")
    con.execute("INSERT INTO analyses VALUES ('a1', 'p1', 'accepted')")
    con.close()
    s = Store(path)
    cols = {r["column_name"] for r in s.query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'analyses'")}
    assert {"abstract_text", "abstract_token_ids", "mode", "reject_reason"} <= cols
    assert s.query("SELECT status, abstract_text FROM analyses") == [{"status": "accepted", "abstract_text": None}]


def test_writer_shares_one_connection_per_burst_and_lets_go_when_idle(tmp_path):
    import subprocess
    import sys

    from mel_core.store.writer import _shared

    s = Store(tmp_path / "m.duckdb")
    shared = _shared(s.path, Store.IDLE_RELEASE_S)
    s.insert("metrics", [{"run_id": "r", "step": 1, "name": "a", "value": 1.0}])
    con = shared.con
    s.query("SELECT * FROM metrics")
    assert con is not None and shared.con is con  # the burst reused the open connection
    # idle: the lock goes back, so another writer process (mel eval adding evaluations) gets in
    reader = subprocess.run([sys.executable, "-c", (
        "import sys; from mel_core.store.writer import Store; "
        "print(Store(sys.argv[1], lock_wait_s=5).query('SELECT count(*) AS n FROM metrics')[0]['n'])"),
        str(s.path)], capture_output=True, text=True, timeout=60)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.strip() == "1"
    assert shared.con is None
