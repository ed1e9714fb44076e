"""Bounded readers: `mel query` runs the user's statement under a memory limit, one DuckDB thread and a time
limit (each raisable by a flag), and a statement that reaches one stops with one line saying which.

DuckDB's memory_limit covers its buffer manager only; repeat('x', 2e9) builds its 2 GB string outside it, and
without the reader's address-space cap it ran to ~8 GB of resident memory. Each test opens a store of its own:
memory_limit and threads belong to the DuckDB instance, which a process's readers of one file share.
"""

import resource
import subprocess
import sys

import pytest

from mel_core.store.database import QueryLimit
from mel_core.store.reader import ReaderLimits, StoreReader, bounded_readers, parse_size
from mel_core.store.writer import Store
from tests.test_hostile import mel, one_line

FOREVER = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r"


@pytest.fixture
def db(tmp_path):
    Store(tmp_path / "run" / "mel.duckdb")  # created and published: a snapshot for readers
    return tmp_path / "run"


def test_a_huge_string_stops_at_the_memory_limit_in_one_line(db):
    # A process of its own, so its peak resident memory is the query's alone.
    report = "import resource, sys; from mel_app import cli; rc = cli.main(sys.argv[1:]); " \
             "print(rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrlimit(resource.RLIMIT_AS)[0])"
    done = subprocess.run([sys.executable, "-c", report, "query", "--db", str(db), "SELECT repeat('x', 2000000000) AS s"],
                          capture_output=True, text=True, timeout=300)
    rc, peak_kb, soft = (int(x) for x in done.stdout.split())
    assert rc == 2
    line = one_line(done.stderr)
    assert line.startswith("mel: query stopped at the reader's memory limit of 1GB (--memory-limit SIZE to raise it)")
    # The cap is the process's size when the query starts (the interpreter, DuckDB: a few hundred MB) plus the 1 GB
    # limit, so its peak stays below that sum, short of the 2 GB string itself (it ran to ~8 GB before).
    assert peak_kb < 1_900_000
    assert soft == resource.RLIM_INFINITY  # the cap was the query's, not the process's for good


def test_an_endless_query_stops_at_the_time_limit_in_one_line(db):
    rc, out, err = mel("query", "--db", db, "--time-limit", "2", FOREVER)
    assert rc == 2 and out == ""
    assert one_line(err) == ("mel: query stopped at the reader's time limit of 2 s (--time-limit SECONDS to raise it, "
                             "0 for none)  (--debug or MEL_DEBUG=1 for the traceback)")


def test_the_defaults_are_set_and_locked_and_the_flags_raise_them(db, tmp_path):
    rc, out, _ = mel("query", "--db", db, "--format", "csv",
                     "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t")
    assert rc == 0 and out.splitlines() == ["m,t", "953.6 MiB,1"]  # 1GB = 10^9 bytes, as DuckDB prints it
    with StoreReader(db, limits=ReaderLimits()) as r, pytest.raises(Exception, match="configuration has been locked"):
        r.con.execute("SET threads = 8")

    raised = tmp_path / "raised"
    Store(raised / "mel.duckdb")
    rc, out, _ = mel("query", "--db", raised, "--format", "csv", "--memory-limit", "4GB", "--threads", "2",
                     "--time-limit", "0", "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t,"
                     " length(repeat('x', 1500000000)) AS n")
    assert rc == 0 and out.splitlines() == ["m,t,n", "3.7 GiB,2,1500000000"]  # past 1GB once raised


def test_a_query_within_its_limits_and_the_time_limit_of_a_quick_one(db):
    with StoreReader(db, limits=ReaderLimits(seconds=0.5)) as r:
        cols, rows = r.query_user("SELECT count(*) AS n FROM checkpoints")
        assert rows == [(0,)]
        with pytest.raises(QueryLimit, match="time limit of 0.5 s"):
            r.query_user(FOREVER)
        assert r.query_user("SELECT 42")[1] == [(42,)]  # the interrupted connection reads on


@pytest.mark.parametrize("flag, value", [("--memory-limit", "lots"), ("--memory-limit", "0GB"), ("--threads", "0"),
                                         ("--time-limit", "-1"), ("--time-limit", "nan")])
def test_a_bad_limit_is_refused_by_the_parser(db, flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        mel("query", "--db", db, flag, value, "SELECT 1")
    assert e.value.code == 2


def test_sizes_read_as_duckdb_writes_them():
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("2.5 gb") == 25 * 10**8
    assert parse_size("1000") == 1000


# ------------------------------------------------------------------ every reader command, one code path


@pytest.mark.parametrize("argv", [
    ["query", "--db", "{run}", "SELECT 1"],
    ["export", "--db", "{run}", "--out", "{tmp}/export"],
    ["lineage", "--db", "{run}", "--checkpoint", "ckpt_none"],
    ["runs", "--root", "{tmp}"],
    ["verify", "{run}"],
    ["report", "{run}", "--out", "{tmp}/report"],
])
def test_every_reader_command_opens_its_readers_under_its_limit_flags(db, tmp_path, monkeypatch, argv):
    opened = []
    init = StoreReader.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self.limits)

    monkeypatch.setattr(StoreReader, "__init__", recording_init)
    argv = [a.replace("{run}", str(db)).replace("{tmp}", str(tmp_path)) for a in argv]
    mel(*argv, "--memory-limit", "2GB", "--threads", "3", "--time-limit", "7")  # some fail on an empty run: fine
    assert opened and set(opened) == {ReaderLimits(memory=2 * 10**9, threads=3, seconds=7.0)}, argv
    with StoreReader(db) as r:  # outside a command: unbounded, as before
        assert r.limits is None


def test_named_reads_and_streams_stop_at_the_time_limit(db):
    with bounded_readers(ReaderLimits(seconds=0.5)), StoreReader(db) as r:
        assert r.query("SELECT current_setting('threads') AS t")[0]["t"] == 1
        with pytest.raises(QueryLimit, match="time limit of 0.5 s"):
            r.query(FOREVER)
        with pytest.raises(QueryLimit, match="time limit of 0.5 s"):  # an export's stream (its first batch waits
            r.query_batches("SELECT sum(hash(range)) AS s FROM range(100000000000)").read_all()  # for the sum)
        assert r.query_batches("SELECT range AS n FROM range(3)").read_all().column("n").to_pylist() == [0, 1, 2]


@pytest.mark.parametrize("flag, increment", [([], 10), (["--nice", "0"], 0), (["--nice", "3"], 3)])
def test_a_reader_runs_behind_the_campaign_for_the_cpu(db, flag, increment):
    """`mel query` as its own process lowers its CPU priority (nice +10 by default, --nice N, 0 = as started): a
    query that computes for its whole time limit then takes little of a core the campaign needs."""
    import os
    import time

    reader = subprocess.Popen([sys.executable, "-m", "mel_app.cli", "query", "--db", str(db), "--time-limit", "20",
                               *flag, FOREVER], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stat = f"/proc/{reader.pid}/stat"
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline:  # its nice once the command has parsed its flags
            seen = int(open(stat).read().rsplit(")", 1)[1].split()[16])  # field 19: nice
            if seen != os.nice(0) or increment == 0 and time.monotonic() > deadline - 50:
                break
            time.sleep(0.1)
        assert seen == min(19, os.nice(0) + increment)
    finally:
        reader.kill()
        reader.wait()
