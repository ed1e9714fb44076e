"""Hostile input gets one clear line and loses nothing.

Readers: every statement that could write, attach, install or change settings, given to `mel query`, is
refused in one line (exit 2) and leaves the store and its snapshot byte-identical with no new file anywhere;
the same statements given straight to a reader's connection (the Python read API, no statement check) are
refused by DuckDB itself — read-only is a property of the connection. Bad input to `mel run`, `mel eval`,
`mel lineage` and `mel report` — out-of-range config values, binary or non-mapping files, foreign, truncated
or missing stores, unwritable run directories, a second campaign on a live run directory — is refused in one
line before any work, naming what is wrong, and nothing is written.
"""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from mel_app import cli
from mel_core import config as C
from mel_core.atomic_files import remove_stale_temps
from mel_core.run import lock
from mel_core.store.database import ForeignStore, snapshot_path
from mel_core.store.reader import StoreReader
from mel_core.store.writer import Store
from tests.scripted import Script, run_step, scripted_runtime


def mel(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mel: "), err
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(*dirs) -> set[Path]:
    return {p for d in dirs if Path(d).exists() for p in Path(d).rglob("*")}


@pytest.fixture(scope="module")
def run(tmp_path_factory, micro_model):
    """A real run directory: one constructed step (accepted meta-experience), its store and snapshot."""
    root = tmp_path_factory.mktemp("hostile")
    cfg = C.load("configs/tiny.yaml", ["run.name=victim", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
                                       "sampling.prompts_per_step=2", "sampling.group_size=4"])
    rt, base = scripted_runtime(cfg, Script())
    run_step(rt, 1, base)
    rt.store.publish()  # the stage functions called directly: publish as the campaign's bookkeeping does
    from mel_core.store.writer import release_connections
    release_connections()
    return rt.run_dir


# ----------------------------------------------------------------------------------- readers

WRITES = ["INSERT INTO runs (run_id) VALUES ('x')", "UPDATE runs SET name = 'x'", "DELETE FROM rollouts",
          "CREATE TABLE t (a INT)", "DROP TABLE rollouts", "ALTER TABLE runs ADD COLUMN z INT",
          "COPY (SELECT 1 AS x) TO '{run}/mel.duckdb' (FORMAT csv)", "COPY rollouts TO '{tmp}/out.csv'",
          "EXPORT DATABASE '{tmp}/export'", "ATTACH '{tmp}/other.duckdb' AS other", "CHECKPOINT",
          "CREATE OR REPLACE VIEW step_summary AS SELECT 1", "INSERT OR REPLACE INTO meta VALUES ('a', 'b')"]
HOSTILE = (
    WRITES
    + [f"EXPLAIN ANALYZE {w}" for w in WRITES] + [f"EXPLAIN {w}" for w in WRITES[:3]]
    + ["INSTALL sqlite", "LOAD sqlite", "FORCE INSTALL httpfs", "SELECT * FROM sqlite_scan('{tmp}/x.db', 't')",
       "SELECT * FROM read_parquet('https://example.com/x.parquet')", "SELECT * FROM read_csv('/etc/passwd')",
       "SELECT * FROM read_text('{run}/mel.duckdb')", "SELECT * FROM glob('/etc/*')",
       "SET threads = 1", "SET enable_external_access = true", "RESET lock_configuration",
       "PRAGMA enable_profiling = 'json'", "PRAGMA profile_output = '{tmp}/profile.json'",
       "CALL pragma_version()", "SELECT 1; DELETE FROM rollouts", "SELECT 1; SELECT 2",
       "WITH x AS (SELECT 1 AS a) INSERT INTO runs (run_id) SELECT a FROM x",
       "WITH x AS (DELETE FROM rollouts RETURNING *) SELECT * FROM x",
       "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')", "DETACH victim", "USE memory", ""])


def _fill(sql: str, run: Path, tmp: Path) -> str:
    return sql.replace("{run}", str(run)).replace("{tmp}", str(tmp))


def test_every_hostile_statement_is_refused_in_one_line_and_changes_nothing(run, tmp_path):
    store, snap = run / "mel.duckdb", snapshot_path(run / "mel.duckdb")
    before = {store: digest(store), snap: digest(snap)}
    files = files_under(run, tmp_path, Path.cwd() / ".tmp")
    duckdb_home = Path.home() / ".duckdb"
    home_before = files_under(duckdb_home)
    for raw in HOSTILE:
        sql = _fill(raw, run, tmp_path)
        rc, out, err = mel("query", "--db", run, sql)
        assert rc == 2 and out == "", (sql, rc, out, err)
        line = one_line(err)
        assert "refused" in line or "empty query" in line or "query failed" in line, (sql, line)
    assert {p: digest(p) for p in before} == before
    assert files_under(run, tmp_path, Path.cwd() / ".tmp") == files
    assert files_under(duckdb_home) == home_before


def test_the_connection_itself_refuses_them_without_the_statement_check(run, tmp_path):
    """The Python read API's query() runs SQL without check_read_only: DuckDB's settings refuse on their own."""
    store, snap = run / "mel.duckdb", snapshot_path(run / "mel.duckdb")
    before = {store: digest(store), snap: digest(snap)}
    files = files_under(run, tmp_path)
    refused = 0
    with StoreReader(run) as reader:
        for raw in HOSTILE:
            sql = _fill(raw, run, tmp_path)
            if not sql or sql.startswith(("SELECT 1; SELECT 2", "CALL pragma_version", "CHECKPOINT",
                                          "EXPLAIN CHECKPOINT", "EXPLAIN ANALYZE CHECKPOINT", "USE memory")):
                continue  # harmless on a read-only connection (a no-op, or read-only by nature)
            with pytest.raises(duckdb.Error):
                reader.query(sql)
            refused += 1
        assert reader.query("SELECT count(*) AS n FROM rollouts")[0]["n"] == 8  # and still reads
    assert refused > 40
    assert {p: digest(p) for p in before} == before
    assert files_under(run, tmp_path) == files


def test_every_reader_command_leaves_the_store_as_it_was(run, tmp_path):
    store = run / "mel.duckdb"
    before = digest(store), digest(snapshot_path(store))
    with StoreReader(run) as r:
        h = r.query("SELECT heuristic_id FROM heuristics WHERE accepted LIMIT 1")[0]["heuristic_id"]
        ck = r.query("SELECT checkpoint_id FROM checkpoints WHERE step = 1")[0]["checkpoint_id"]
    assert mel("query", "--db", run, "SELECT count(*) FROM heuristic_lineage")[0] == 0
    assert mel("lineage", "--db", run, h)[0] == 0
    assert mel("lineage", "--db", run, "--checkpoint", ck)[0] == 0
    assert mel("report", run, "--out", tmp_path / "report")[0] == 0
    assert (digest(store), digest(snapshot_path(store))) == before


# -------------------------------------------------------------------------- foreign, corrupt, missing


@pytest.fixture
def foreign(tmp_path) -> Path:
    """A user's own DuckDB file (not a mel store)."""
    path = tmp_path / "mine" / "mel.duckdb"
    path.parent.mkdir()
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE sales (id INT, amount DOUBLE); INSERT INTO sales VALUES (1, 9.5)")
    con.close()
    return path


def test_a_foreign_store_is_named_and_never_written(foreign, tmp_path, micro_model):
    before = digest(foreign)
    for argv in (["lineage", "--db", foreign, "heuristic_x"], ["report", foreign],
                 ["query", "--db", foreign, "SELECT * FROM sales"],
                 ["eval", "--db", foreign, "--checkpoint", micro_model, "--datasets", "synthetic"]):
        rc, _, err = mel(*argv)
        assert rc == 2 and "not a mel store" in one_line(err), (argv, err)
    with pytest.raises(ForeignStore):
        Store(foreign)  # a writer too: refused before it creates a table
    assert digest(foreign) == before
    assert sorted(p.name for p in foreign.parent.iterdir()) == ["mel.duckdb"]  # no snapshot, no WAL
    text = tmp_path / "notes.duckdb"
    text.write_text("id,amount\n1,9.5\n")
    rc, _, err = mel("query", "--db", text, "SELECT 1")
    assert rc == 2 and "not a DuckDB file" in one_line(err)


def test_a_truncated_store_is_refused_by_mel_run_and_never_written(tmp_path, micro_model):
    cfg = C.load("configs/tiny.yaml", ["run.name=cut", f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}",
                                       "sampling.prompts_per_step=2", "sampling.group_size=4"])
    rt, base = scripted_runtime(cfg, Script())
    run_step(rt, 1, base)
    from mel_core.store.writer import _VERIFIED, release_connections
    release_connections()
    _VERIFIED.clear()  # a new process would check the file afresh
    db = rt.run_dir / "mel.duckdb"
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.truncate(int(size * 0.6))
    before = digest(db)
    rc, _, err = mel("run", "--config", "configs/tiny.yaml", "run.name=cut", f"run.root_dir={tmp_path}",
                     f"model.name_or_path={micro_model}", "sampling.prompts_per_step=2", "sampling.group_size=4")
    line = one_line(err)
    assert rc == 2 and str(db) in line and ("damaged" in line or "cannot be read" in line), line
    assert digest(db) == before and db.stat().st_size == int(size * 0.6)


def test_a_missing_store_is_one_line(tmp_path):
    rc, _, err = mel("query", "--db", tmp_path / "nowhere", "SELECT 1")
    assert rc == 2 and "no store at" in one_line(err)


# ------------------------------------------------------------------------------- mel run: bad input


BAD_VALUES = [("optim.lr", "-1", "must be > 0"), ("sampling.temperature", "-1", "must be > 0"),
              ("sampling.max_new_tokens", "0", "must be >= 1"), ("optim.micro_batch_size", "-1", "must be >= 0"),
              ("run.steps", "0", "must be >= 1"), ("run.steps", "-1", "must be >= 1"),
              ("data.synthetic.train_size", "0", "must be >= 1"), ("sampling.top_p", "1.5", "must be <= 1"),
              ("experience.pairing", "best", "must be one of"), ("loss.nll_coef", "-0.5", "must be >= 0")]


@pytest.mark.parametrize("key, value, why", BAD_VALUES)
def test_an_out_of_range_value_names_key_and_origin_before_any_work(tmp_path, key, value, why):
    root = tmp_path / "runs"
    rc, out, err = mel("run", "--config", "configs/tiny.yaml", f"run.root_dir={root}", f"{key}={value}")
    line = one_line(err)
    assert rc == 2 and f"config key '{key}'" in line and why in line and f"override '{key}={value}'" in line, line
    assert not root.exists() and "campaign" not in out  # nothing created, no campaign started
    # the same value from a file names the file
    section, _, leaf = key.rpartition(".")
    yaml = tmp_path / "bad.yaml"
    nested = f"{leaf}: {value}"
    for part in reversed(section.split(".")):
        nested = f"{part}:\n  " + nested.replace("\n", "\n  ")
    yaml.write_text(f"extends: {Path('configs/tiny.yaml').resolve()}\nrun:\n  root_dir: {root}\n" + nested + "\n"
                    if not key.startswith("run.") else f"extends: {Path('configs/tiny.yaml').resolve()}\n"
                    f"run:\n  root_dir: {root}\n  {leaf}: {value}\n")
    rc, _, err = mel("run", "--config", yaml)
    assert rc == 2 and f"{yaml}: config key '{key}'" in one_line(err)
    assert not root.exists()


def test_every_ranged_field_is_checked():
    """Generically: each field with a documented range refuses a value just outside it, naming the key."""
    checked = 0
    for key, _, _ in C.describe():
        field = _field(key)
        rng, one_of = field.metadata.get("range", {}), field.metadata.get("one_of")
        bad = ("not-a-choice" if one_of else
               rng["ge"] - 1 if "ge" in rng else rng["gt"] if "gt" in rng else
               rng["le"] + 1 if "le" in rng else rng["lt"] if "lt" in rng else None)
        if bad is None:
            continue
        with pytest.raises(C.ConfigError, match=f"config key '{key}'"):
            C.load("configs/tiny.yaml", [f"{key}={bad}"])
        checked += 1
    assert checked > 60


def _field(dotted: str):
    import dataclasses
    import typing

    cls = C.MelConfig
    *parents, leaf = dotted.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
    return {f.name: f for f in dataclasses.fields(cls)}[leaf]


def test_yaml_whose_top_level_is_a_list_is_one_line(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- run\n- model\n")
    rc, _, err = mel("run", "--config", bad)
    assert rc == 2 and f"{bad}: the top level must be a mapping" in one_line(err)


def test_a_binary_dataset_names_its_file_and_line(tmp_path):
    blob = tmp_path / "problems.jsonl"
    blob.write_bytes(b'{"problem": "1+1", "answer": "2"}\n\x89PNG\r\n\x1a\n' + bytes(range(128, 256)) * 4)
    rc, _, err = mel("run", "--config", "configs/tiny.yaml", f"run.root_dir={tmp_path / 'runs'}", f"data.source={blob}")
    assert rc == 2 and f"{blob}:2: not UTF-8 text" in one_line(err)
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_run_directory_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a run root that is a file: nothing can be created under it (even as root)
    rc, _, err = mel("run", "--config", "configs/tiny.yaml", f"run.root_dir={blocker}")
    assert rc == 2 and "cannot be written" in one_line(err)


def test_eval_of_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("hello")
    rc, _, err = mel("eval", "--checkpoint", tmp_path / "ckpt", "--datasets", "synthetic")
    assert rc == 2 and "is not a checkpoint: no config.json" in one_line(err)


@pytest.mark.slow
def test_problems_longer_than_the_context_are_named_before_step_one(prefect_harness, tmp_path, micro_model):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"problem": " + ".join(["1"] * 400), "answer": "400"}) + "\n")
    from prefect.settings import PREFECT_API_URL

    # a process of its own, as a user runs it: Prefect's logging is set up by `mel`, not by this test session
    done = subprocess.run([sys.executable, "-m", "mel_app.cli", "run", "--config", "configs/tiny.yaml",
                           f"run.root_dir={tmp_path / 'runs'}", f"model.name_or_path={micro_model}",
                           f"data.source={data}", "sampling.prompts_per_step=2"], capture_output=True, text=True,
                          env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()), timeout=300)
    rc, line = done.returncode, one_line(done.stderr)
    assert rc == 2 and f"{data}:2: the solve prompt is" in line and "data.too_long=skip" in line, line
    store = tmp_path / "runs" / "tiny-arithmetic" / "mel.duckdb"
    assert Store(store).query("SELECT count(*) AS n FROM rollouts")[0]["n"] == 0  # no step ran


@pytest.mark.slow
def test_eval_refuses_a_question_longer_than_the_context_and_records_nothing(prefect_harness, tmp_path, micro_model):
    """`mel eval` used to generate from a 20,000-token question on a 256-token model and score it."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"problem": " + ".join(["12"] * 7000), "answer": "84000"}) + "\n")
    from prefect.settings import PREFECT_API_URL

    # a process of its own, as a user runs it: Prefect's logging is set up by `mel`, not by this test session
    done = subprocess.run([sys.executable, "-m", "mel_app.cli", "eval", "--checkpoint", str(micro_model), "--datasets",
                           str(data), f"run.root_dir={tmp_path / 'runs'}", "model.max_seq_len=256", "eval.k=0"],
                          capture_output=True, text=True, env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()),
                          timeout=300)
    rc, line = done.returncode, one_line(done.stderr)
    assert rc == 2 and line.startswith(f"mel: {data}:2: the solve prompt is "), line
    tokens = int(line.split("the solve prompt is ")[1].split()[0])
    assert tokens > 20_000 and "eval.max_new_tokens=64 it does not fit the context of 256 tokens (1 of 2" in line
    store = Store(tmp_path / "runs" / "tiny-arithmetic" / "mel.duckdb")
    assert store.query("SELECT count(*) AS n FROM eval_samples")[0]["n"] == 0  # nothing generated or scored
    assert store.query("SELECT count(*) AS n FROM evals")[0]["n"] == 0


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(C.ConfigError):
        cli.main(["--debug", "run", "--config", "configs/tiny.yaml", "optim.lr=-1"])


# ------------------------------------------------------------------------ one campaign per run dir


@pytest.mark.slow
def test_a_second_campaign_on_a_live_run_directory_is_refused_naming_the_holder(tmp_path, micro_model):
    args = ["run", "--config", "configs/tiny.yaml", "run.name=busy", f"run.root_dir={tmp_path}", "run.steps=3",
            f"model.name_or_path={micro_model}", "sampling.prompts_per_step=2", "sampling.group_size=4"]
    first = subprocess.Popen([sys.executable, "-m", "tests.scripted_campaign", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while lock.holder(tmp_path / "busy") is None:
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.1)
        rc, out, err = mel(*args)
        line = one_line(err)
        assert rc == 2 and f"pid {first.pid}" in line and "in use by another campaign" in line, line
        assert "campaign 'busy'" not in out
        assert first.wait(600) == 0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, 9)
    s = Store(tmp_path / "busy" / "mel.duckdb")
    twice = s.query("SELECT step, stage, count(*) AS n FROM stage_runs WHERE status = 'completed' GROUP BY ALL "
                    "HAVING count(*) > 1")
    assert twice == [] and s.query("SELECT count(*) AS n FROM stage_runs WHERE status != 'completed'")[0]["n"] == 0


def test_the_lock_is_exclusive_in_one_process_too(tmp_path):
    with lock.run_lock(tmp_path / "r", log=lambda s: None) as me:
        assert lock.holder(tmp_path / "r")["pid"] == me["pid"] == os.getpid()
        with pytest.raises(lock.RunLocked, match=f"pid {os.getpid()}"):
            with lock.run_lock(tmp_path / "r"):
                pass
    assert lock.holder(tmp_path / "r") is None


def test_temp_cleanup_removes_only_its_own_or_dead_processes_leftovers(tmp_path):
    import socket

    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "step-00001"
    names = {f"step-00001.tmp-{host}-{live.pid}": True, f"step-00001.tmp-{host}-{dead.pid}": False,
             f"step-00001.tmp-{host}-{os.getpid()}": False, f"step-00001.tmp-{host}-{dead.pid}.work": False,
             f"step-00001.tmp-otherhost-{dead.pid}": True}
    try:
        for name in names:
            (tmp_path / name).mkdir()
        remove_stale_temps(target)
        assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}
    finally:
        live.kill()
