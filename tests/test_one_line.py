"""One line, exit 2, everywhere: each hostile probe of issue 21 (item 7), done for real.

A foreign file named by `extends:`, a 100,000-character run.name, an export or `mel query --out` onto a directory
or into a read-only filesystem, `mel serve --port -1/70000`, a second `mel serve` on a port, a script that verifies
without a `__main__` guard, Ctrl-C on a long `mel query`, a truncated checkpoint, a disk that fills up during a
campaign: each is one line on stderr (no traceback, no nanobind leak report) with its exit code.
"""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from mel_core.store.writer import Store
from tests.test_hostile import mel, one_line

REPO = Path(__file__).resolve().parent.parent
PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nbin:x:2:2:bin:/bin:/usr/sbin/nologin\n"


def _cli(*argv, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """`mel` as a user runs it: a process of its own (its exit path, stderr and exit code are the real ones)."""
    return subprocess.run([sys.executable, "-m", "mel_app.cli", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, check=False, **kwargs)


@pytest.fixture
def store(tmp_path):
    Store(tmp_path / "run" / "mel.duckdb")  # created and published: a snapshot for readers
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------------- config


def test_extends_of_a_foreign_file_names_it_and_its_first_line_only(tmp_path):
    foreign = tmp_path / "passwd"
    foreign.write_text(PASSWD)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"extends: {foreign}\nrun:\n  steps: 1\n")
    rc, out, err = mel("run", "--config", cfg, f"run.root_dir={tmp_path / 'runs'}")
    line = one_line(err)
    assert rc == 2 and out == ""
    assert line.startswith(f"mel: {foreign}: line 1: 'root:x:0:0:root:/root:/bin/bash' is not a config section")
    assert "daemon" not in line  # the rest of the file is not printed (it was, twice)
    assert not (tmp_path / "runs").exists()


def test_a_100k_character_run_name_is_one_line_before_any_work(tmp_path):
    rc, out, err = mel("run", "--config", "configs/tiny.yaml", f"run.name={'a' * 100_000}",
                       f"run.root_dir={tmp_path / 'runs'}")
    line = one_line(err)
    assert rc == 2 and out == ""
    assert "config key 'run.name': must be a directory name of at most 255 bytes, got 100000" in line
    assert len(line) < 400  # the name itself is cut in the line
    assert not (tmp_path / "runs").exists()  # refused before any work (was OSError [Errno 36], exit 1)


# ------------------------------------------------------------------------------------------------- outputs


def test_export_and_query_onto_a_directory_are_one_line_exit_2(store, tmp_path):
    out = tmp_path / "out"
    (out / "rollouts.parquet").mkdir(parents=True)  # where the export's first file goes
    rc, _, err = mel("export", "--db", store, "--out", out)
    assert rc == 2
    assert one_line(err).startswith(f"mel: --out {out}: cannot write there ({out / 'rollouts.parquet'}): Is a "
                                    f"directory")
    assert sorted(p.name for p in out.iterdir()) == ["rollouts.parquet"]  # no temp left behind

    target = tmp_path / "result.csv"
    target.mkdir()
    rc, _, err = mel("query", "--db", store, "--out", target, "SELECT 1 AS x")
    assert rc == 2 and one_line(err).startswith(f"mel: --out {target}: cannot write there: Is a directory")
    assert list(target.iterdir()) == []


def test_export_into_a_read_only_filesystem_is_one_line(store, tmp_path):
    # a real read-only filesystem: a bind mount remounted read-only in a mount namespace of the command's own
    # (root ignores directory permissions, so chmod cannot make one)
    source, mount = tmp_path / "src", tmp_path / "ro"
    source.mkdir()
    mount.mkdir()
    setup = f"mount --bind {source} {mount} && mount -o remount,bind,ro {mount}"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{setup} && ! touch {mount}/x"], capture_output=True, check=False)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip(f"no mount namespace here to make a read-only filesystem: {probe.stderr!r}")
    cmd = f"{setup} && exec {sys.executable} -m mel_app.cli export --db {store} --out {mount}/export"
    done = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr).startswith(f"mel: --out {mount}/export: cannot write there: Read-only file system")


# ------------------------------------------------------------------------------------------------- serve


@pytest.mark.parametrize("port", ["-1", "70000", "http"])
def test_serve_on_a_port_that_is_not_one_is_one_line_naming_port(port):
    done = _cli("serve", f"--port={port}")  # was "Invalid host" (-1) and 176 lines ending "An exception occurred."
    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mel serve: error: argument --port: '{port}' is not a port (a whole number from 1 to "
                          f"65535)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_serve_on_a_port_says_it_is_in_use(tmp_path):
    port = _free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"))
    first = subprocess.Popen([sys.executable, "-m", "mel_app.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        lock = Path(tempfile.gettempdir()) / f"mel-serve-{port}.lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first mel serve did not start"
            time.sleep(0.1)
        started = time.monotonic()
        second = _cli("serve", "--port", port, env=env)
        assert second.returncode == 1
        assert one_line(second.stderr) == (f"mel: port {port} is in use by another `mel serve` (pid {first.pid}); "
                                           f"pick another --port")
        assert time.monotonic() - started < 30  # at once, not after the server's start-up
        assert second.stdout == ""
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=60)


def test_serve_on_a_port_another_program_holds_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = _cli("serve", "--port", port, env=dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect")))
    assert done.returncode == 1
    assert one_line(done.stderr) == (f"mel: port {port} on 127.0.0.1 is in use (another `mel serve`, or another "
                                     f"server); pick another --port")


# ------------------------------------------------------------------------------------------------- signals, scripts


def test_ctrl_c_on_a_long_query_is_one_line_exit_130(store):
    # SIGINT to the process group, as a terminal sends it; the query would run for hours (DuckDB folds count(*) of
    # a range, hashing every value it cannot)
    p = subprocess.Popen([sys.executable, "-m", "mel_app.cli", "query", "--db", str(store), "--time-limit", "0",
                          "SELECT sum(hash(range)) FROM range(100000000000)"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)  # SIGINT handled (not
    # ignored, as a shell's background job has it): pytest's handler is reset to the default at exec
    time.sleep(5)
    assert p.poll() is None, p.communicate()
    os.killpg(p.pid, signal.SIGINT)
    started = time.monotonic()
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert p.returncode == 130 and out == ""
    assert one_line(err) == "mel: interrupted"  # was "mel: RuntimeError: Query interrupted", exit 1


def test_a_script_that_verifies_without_a_main_guard_fails_fast_in_one_line(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent("""\
        from mel_core.algorithm.rewards import verify_batch
        print(verify_batch("math", ["\\\\boxed{2}"], ["2"]))
    """))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), MEL_VERIFY_WORKERS="2"), check=False)
    assert time.monotonic() - started < 60
    assert done.returncode == 1 and done.stdout == ""
    assert one_line(done.stderr) == (f"mel: verification workers cannot start: each one re-runs {script} "
                                     f"(multiprocessing spawn), which verifies when it is imported; put the script's "
                                     f'work under `if __name__ == "__main__":`')
    assert not list(Path(tempfile.gettempdir()).glob("mel-verify-unguarded-*"))  # the worker's word, taken


# ------------------------------------------------------------------------------------------------- damaged files


def test_eval_of_a_truncated_checkpoint_is_one_line_exit_2(tmp_path, micro_model):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(micro_model, ckpt)
    weights = ckpt / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    # as a user runs it, a process of its own: Prefect's logging is then the one `mel` sets up, not this test
    # process's (configured once, at its first import of Prefect, by whichever test came first)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING")}
    done = _cli("eval", "--checkpoint", ckpt, "--datasets", "synthetic", f"model.name_or_path={micro_model}",
                f"run.root_dir={tmp_path / 'runs'}", timeout=300, env=dict(env, PREFECT_HOME=str(tmp_path / "prefect")))
    rc, err = done.returncode, done.stderr
    assert rc == 2 and "Traceback" not in err, err
    failure = [line for line in err.splitlines() if "cannot be read" in line]  # after its "evaluating ..." lines
    assert len(failure) == 1 and failure == err.strip().splitlines()[-1:]
    assert failure[0].startswith(f"mel: checkpoint {ckpt} cannot be read, its files are damaged or incomplete: "
                                 f"SafetensorError: ")  # was "mel: SafetensorError: ...", exit 1


ENOSPC_AT_PUBLISH = """
import errno, sys
import mel_core.store.writer as writer
original, calls = writer.copy_file_atomically, [0]
def copy(src, dst):  # the disk fills up after the store's first snapshots
    calls[0] += 1
    if calls[0] > 3:
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    return original(src, dst)
writer.copy_file_atomically = copy
from mel_app.cli import main
sys.argv[0] = "mel"
sys.exit(main())
"""


@pytest.mark.slow
def test_a_full_disk_during_a_campaign_is_one_line_without_leak_reports(prefect_harness, tmp_path, micro_model):
    """The ENOSPC is injected at the store's snapshot copy (a real full disk needs a tiny filesystem, which needs
    root's mount here): the error path is the real one, with the campaign's DuckDB objects alive at exit, where
    DuckDB's bindings printed 44 lines of "nanobind: leaked instances" under the error."""
    from prefect.settings import PREFECT_API_URL

    done = subprocess.run([sys.executable, "-c", ENOSPC_AT_PUBLISH, "run", "--config", "configs/tiny.yaml",
                           f"run.root_dir={tmp_path / 'runs'}", f"model.name_or_path={micro_model}", "run.steps=1",
                           "sampling.prompts_per_step=2", "sampling.group_size=4"], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value()), timeout=600,
                          check=False)
    everything = done.stdout + done.stderr
    assert done.returncode == 1, everything[-3000:]
    assert "nanobind" not in everything and "Traceback" not in everything, everything[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mel: OSError: [Errno {errno.ENOSPC}] No space left on device: "), everything[-3000:]


def test_a_checkpoint_write_on_a_full_disk_names_the_file_and_the_free_space(tmp_path, monkeypatch):
    import torch

    from mel_core.model.checkpoints import OPTIMIZER_FILE, write_checkpoint

    class Saves:
        def save_pretrained(self, directory, **kwargs):
            pass

    def full(*args, **kwargs):  # what torch.save raises when the disk fills up under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2048 vs 1971")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=rf"^cannot write {tmp_path / OPTIMIZER_FILE}: .* free on its filesystem "
                                      r"\(torch.save: \[enforce fail at inline_container.cc:672\]"):
        write_checkpoint(tmp_path, Saves(), Saves(), {}, None)
