"""`mel query --format table|csv|json|markdown` and `--out FILE.csv|.json|.parquet` on a constructed store.

The rows are chosen to break naive output: a text longer than the table's width, one with a newline, a pipe,
a comma and a quote, a NULL, a list, a NaN. The table cuts only with --width and says how many cells it cut;
csv and json never cut and read back to the stored values; a one-value result in csv is the bare value; every
--out suffix writes a file that reads back to the same rows; bad options are one line, exit 2, and write
nothing.
"""

import csv
import io
import json

import pyarrow.parquet as pq
import pytest

from mel_core.store.writer import Store, release_connections
from tests.test_hostile import mel, one_line

LONG = "If a step uses an earlier result, then copy that result exactly, " * 3  # 195 characters
TRICKY = 'line one\nline two | with a pipe, a comma and a "quote"'
HEURISTICS = [("heuristic_a", 1, LONG, True), ("heuristic_b", 1, TRICKY, False), ("heuristic_c", 2, None, None)]
SELECT = "SELECT heuristic_id, step, text, accepted FROM heuristics ORDER BY heuristic_id"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "run" / "mel.duckdb"
    store = Store(path)
    store.insert("heuristics", [{"heuristic_id": h, "step": s, "text": t, "accepted": a, "run_id": "run_x"}
                                for h, s, t, a in HEURISTICS])
    store.insert("rollouts", [{"rollout_id": "rollout_a", "run_id": "run_x", "step": 1, "token_ids": [5, 6, 7],
                               "reward": float("nan")}])
    store.publish()
    release_connections()
    return path


def query(db, *argv) -> str:
    rc, out, err = mel("query", "--db", db, *argv)
    assert rc == 0 and err == "", err
    return out


def test_the_table_cuts_only_past_its_width_and_says_so(db):
    out = query(db, SELECT)
    assert LONG not in out and LONG[:59] + "…" in out
    assert out.splitlines()[-1] == ("(3 rows; 1 cell cut to 60 characters, ending in …: --width 0 shows them whole, "
                                    "--format csv or json never cuts)")
    whole = query(db, SELECT, "--width", "0")
    assert LONG in whole and "…" not in whole and whole.splitlines()[-1] == "(3 rows)"
    narrow = query(db, SELECT, "--width", "5")
    assert "5 cells cut to 5 characters" in narrow.splitlines()[-1]  # three ids, two texts (NULL and False fit)


def test_csv_is_whole_and_reads_back(db):
    rows = list(csv.reader(io.StringIO(query(db, SELECT, "--format", "csv"))))
    assert rows == [["heuristic_id", "step", "text", "accepted"], ["heuristic_a", "1", LONG, "true"],
                    ["heuristic_b", "1", TRICKY, "false"], ["heuristic_c", "2", "", ""]]


def test_csv_of_a_count_is_just_the_number(db):
    assert query(db, "SELECT count(*) FROM heuristics", "--format", "csv") == "3\n"
    assert query(db, "SELECT count(*) AS n, 1 AS one FROM heuristics", "--format", "csv") == "n,one\n3,1\n"


def test_json_is_whole_and_typed(db):
    rows = json.loads(query(db, SELECT, "--format", "json"))
    assert rows == [{"heuristic_id": h, "step": s, "text": t, "accepted": a} for h, s, t, a in HEURISTICS]
    other = json.loads(query(db, "SELECT token_ids, reward, now()::TIMESTAMP AS at FROM rollouts", "--format", "json"))
    assert other[0]["token_ids"] == [5, 6, 7] and other[0]["reward"] is None  # NaN: JSON has none
    assert other[0]["at"][4] == "-" and "T" in other[0]["at"]  # ISO 8601


def test_markdown_is_a_table_of_whole_one_line_cells(db):
    lines = query(db, SELECT, "--format", "markdown").splitlines()
    assert lines[0] == "| heuristic_id | step | text | accepted |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == f"| heuristic_a | 1 | {LONG} | True |"
    assert lines[3] == '| heuristic_b | 1 | line one<br>line two \\| with a pipe, a comma and a "quote" | False |'
    assert lines[4] == "| heuristic_c | 2 | NULL | NULL |" and len(lines) == 5


def test_out_csv_json_parquet_read_back_to_the_rows(db, tmp_path):
    expected = [{"heuristic_id": h, "step": s, "text": t, "accepted": a} for h, s, t, a in HEURISTICS]
    for suffix in ("csv", "json", "parquet"):
        path = tmp_path / f"result.{suffix}"
        assert query(db, SELECT, "--out", path) == f"mel: wrote 3 rows to {path}\n"
    assert json.loads((tmp_path / "result.json").read_text()) == expected
    assert pq.read_table(tmp_path / "result.parquet").to_pylist() == expected
    rows = list(csv.DictReader((tmp_path / "result.csv").open(newline="")))
    assert [r["text"] for r in rows] == [LONG, TRICKY, ""] and rows[0]["accepted"] == "true"
    # a file always has its header, also for one value; parquet keeps DuckDB's list type
    count = tmp_path / "count.csv"
    query(db, "SELECT count(*) AS n FROM heuristics", "--out", count)
    assert count.read_text() == "n\n3\n"
    lists = tmp_path / "lists.parquet"
    query(db, "SELECT token_ids FROM rollouts", "--out", lists)
    assert pq.read_table(lists).column("token_ids").to_pylist() == [[5, 6, 7]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count.csv", "lists.parquet", "result.csv", "result.json",
                                                          "result.parquet"]  # no temp files left


@pytest.mark.parametrize("argv, says", [
    (["--format", "xml"], "--format 'xml': expected one of table, csv, json, markdown"),
    (["--width", "-1"], "--width -1: expected a number of characters, or 0 for no limit"),
    (["--out", "{tmp}/result.txt"], "the suffix says the format; expected .csv, .json, .parquet"),
])
def test_bad_options_are_one_line_and_write_nothing(db, tmp_path, argv, says):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = mel("query", "--db", db, SELECT, *argv)
    assert rc == 2 and out == "" and says in one_line(err), err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_statement_writes_no_out_file(db, tmp_path):
    rc, out, err = mel("query", "--db", db, "DELETE FROM heuristics", "--out", tmp_path / "x.parquet")
    assert rc == 2 and out == "" and "refused" in one_line(err) and list(tmp_path.iterdir()) == []


def test_a_reader_that_goes_away_stops_the_output_quietly(db):
    """`mel query ... | head -1`: when the pipe closes under mel, it stops without an error line (exit 141, as a
    shell reports a process ended by SIGPIPE). The closed pipe is a stdout whose write fails as a real one does."""
    import contextlib

    from mel_app import cli

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    err = io.StringIO()
    with contextlib.redirect_stdout(ClosedPipe()), contextlib.redirect_stderr(err):
        rc = cli.main(["query", "--db", str(db), "--format", "csv", "SELECT range AS n FROM range(1000)"])
    assert rc == 141 and err.getvalue() == "", err.getvalue()
