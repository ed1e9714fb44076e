"""The store benchmark must not rot: run its main function at a tiny size (no timing assertions)."""

import importlib.util
import re
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parent.parent


def _load_bench():
    spec = importlib.util.spec_from_file_location("mel_bench_store", REPO / "benchmarks" / "store.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_store_benchmark_runs_at_tiny_size(tmp_path, capsys):
    bench = _load_bench()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## other.py\n\nkept as is\n")
    work = tmp_path / "work"
    res = bench.main(["--rollouts", "4096", "--heuristics", "200", "--lookups", "10", "--chunk-steps", "1",
                      "--step-window", "1", "--micro-rows", "512", "--cli-runs", "1", "--dir", str(work), "--doc", str(doc)])
    out = capsys.readouterr().out.strip().splitlines()

    # One `name: value` line per headline metric at the end, the main one last.
    tail = out[-len(bench.HEADLINE_ORDER):]
    names = [ln.split(":")[0] for ln in tail]
    assert names == list(bench.HEADLINE_ORDER)
    assert all(re.fullmatch(r"store_[a-z0-9_]+: [0-9.e+-]+", ln) for ln in tail), tail
    assert tail[-1].startswith("store_lineage_ms_p50: ")

    # Every lineage lookup found exactly one row, and the corpus joins end to end.
    assert res["lineage"]["rows_per_lookup"] == [1]
    assert res["counts"]["rollouts"] == 4096 and res["counts"]["heuristics"] == 200
    con = duckdb.connect(str(work / "corpus.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM heuristic_lineage").fetchall()[0][0] == 200
        hid = res["lineage_probe_id"]
        assert len(con.execute(bench.LINEAGE_SQL, [hid]).fetchall()) == 1
    finally:
        con.close()

    # The doc section was written and the other sections kept.
    text = doc.read_text()
    assert "## other.py\n\nkept as is" in text and "## store.py" in text and "lineage" in text


def test_writer_insert_paths_match_insert_or_ignore(tmp_path):
    """Writer.insert may skip existing keys with an anti-join instead of INSERT OR IGNORE (faster on large
    batches): whatever path it takes, the table must end up exactly as INSERT OR IGNORE leaves it."""
    import pyarrow as pa

    from mel_core.store.schema import TABLES
    from mel_core.store.writer import Store

    batches = [
        ("rollouts", [{"rollout_id": f"r{i}", "text": f"t{i}", "token_ids": [i, i + 1]} for i in range(50)]),
        ("rollouts", [{"rollout_id": f"r{i}", "text": "changed", "token_ids": [0]} for i in range(40, 60)]),
        ("rollouts", [{"rollout_id": "d", "text": "first"}, {"rollout_id": "d", "text": "second"}]),
        ("internalized", [{"update_id": "u1", "heuristic_id": "h1", "analysis_id": "a"},
                          {"update_id": "u1", "heuristic_id": "h2"}]),
        ("internalized", [{"update_id": "u1", "heuristic_id": "h1", "analysis_id": "changed"},
                          {"update_id": "u2", "heuristic_id": "h1"}]),
        ("metrics", [{"run_id": "r", "step": 1, "name": "a", "value": 1.0}]),
        ("metrics", [{"run_id": "r", "step": 1, "name": "a", "value": 9.0},
                     {"run_id": "r", "step": 2, "name": "a", "value": 2.0}]),
        ("runs", [{"run_id": 7, "name": "an int for a VARCHAR key"}]),
        ("runs", [{"run_id": "7", "name": "again"}]),
    ]
    store = Store(tmp_path / "m.duckdb")
    ref = duckdb.connect(":memory:")
    for name, cols in TABLES.items():
        ref.execute(f"CREATE TABLE {name} ({cols})")
    for i, (table, rows) in enumerate(batches):
        with store.transaction() as w:
            if i % 2:
                w.insert_arrow(table, pa.Table.from_pylist(rows))
            else:
                w.insert(table, rows)
        ref.register("_r", pa.Table.from_pylist(rows))
        ref.execute(f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM _r")
        ref.unregister("_r")
    for table in ("rollouts", "internalized", "metrics", "runs"):
        got = sorted(map(repr, (tuple(r.values()) for r in store.query(f"SELECT * FROM {table}"))))
        want = sorted(map(repr, ref.execute(f"SELECT * FROM {table}").fetchall()))
        assert got == want, table
