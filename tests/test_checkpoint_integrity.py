"""Checksummed checkpoints: every file a run writes into a checkpoint has its size and digest recorded with the
checkpoint's row; a load that trains or evaluates checks them first and refuses a damaged file in one line, and
`mel verify RUN` checks a whole run.

The campaign test is the failure as it was reported: a real campaign, 4,096 bytes XORed in the middle of the last
checkpoint's weights, then the run extended — which used to train on the damaged weights and record a new
checkpoint as if nothing had happened.
"""

import random
import shutil
from pathlib import Path

import duckdb
import pytest

from mel_app import cli
from mel_core.model import checkpoints
from mel_core.model.checkpoints import DamagedCheckpoint, damaged_files, file_digests, verify_checkpoint
from mel_core.step.runtime import clear_runtimes
from mel_core.store import lineage
from mel_core.store.database import snapshot_path
from mel_core.store.reader import StoreReader
from mel_core.store.writer import Store


def _flip(path: Path, offset: int, n: int = 4096) -> None:
    """XOR `n` bytes of the file from `offset`: damage that keeps its size."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _checkpoint_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(random.Random(0).randbytes(204_800))  # 200 KiB, no two blocks alike
    (d / "config.json").write_text('{"a": 1}')
    (d / "empty.txt").write_bytes(b"")
    (d / "sub" / "nested.bin").write_bytes(b"x" * 10)
    return d


# ------------------------------------------------------------------------------------------- the digests


def test_every_kind_of_damage_is_named_and_an_intact_checkpoint_passes(tmp_path):
    d = _checkpoint_dir(tmp_path)
    recorded = file_digests(d)
    assert [r.file for r in recorded] == ["config.json", "empty.txt", "model.safetensors", "sub/nested.bin"]
    assert damaged_files(d, recorded) == []
    (d / "new-file").write_text("added later")  # never part of the checkpoint: not judged
    assert damaged_files(d, recorded) == []

    _flip(d / "model.safetensors", 100_000)
    (d / "config.json").write_text('{"a": 12}')  # one byte longer
    (d / "sub" / "nested.bin").unlink()
    bad = dict(damaged_files(d, recorded))
    assert set(bad) == {str(d / "model.safetensors"), str(d / "config.json"), str(d / "sub" / "nested.bin")}
    assert "digest mismatch" in bad[str(d / "model.safetensors")]
    assert bad[str(d / "config.json")] == "9 bytes, 8 when it was written"
    assert bad[str(d / "sub" / "nested.bin")] == "missing"

    with pytest.raises(DamagedCheckpoint) as e:
        verify_checkpoint("ckpt_x", d, recorded)
    assert len(str(e.value).splitlines()) == 1
    assert str(d / "config.json") in str(e.value) and "and 2 more files" in str(e.value)


def test_a_change_in_any_block_of_a_many_block_file_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_BLOCK", 4096)  # 200 KiB = 50 blocks, hashed on the thread pool
    d = _checkpoint_dir(tmp_path)
    recorded = file_digests(d)
    for offset in (0, 4096 * 17 + 5, 204_799):  # the first, a middle and the very last byte
        _flip(d / "model.safetensors", offset, 1)
        assert [f for f, _ in damaged_files(d, recorded)] == [str(d / "model.safetensors")]
        _flip(d / "model.safetensors", offset, 1)  # repaired
        assert damaged_files(d, recorded) == []
    # the digest covers the order of the blocks, not only their set
    swapped = d / "model.safetensors"
    data = swapped.read_bytes()
    swapped.write_bytes(data[4096:8192] + data[:4096] + data[8192:])
    assert damaged_files(d, recorded) != []


def test_a_digest_of_an_unknown_scheme_is_refused_not_skipped(tmp_path):
    d = _checkpoint_dir(tmp_path)
    recorded = [checkpoints.FileDigest(r.file, r.size, r.digest, "sha999") for r in file_digests(d)]
    assert all("cannot check" in what for _, what in damaged_files(d, recorded))


# --------------------------------------------------------------------------- a campaign, damaged, extended


def _mel(*argv) -> int:
    return cli.main(list(argv))


def _run(root, micro_model, steps: int) -> int:
    clear_runtimes()  # each `mel run` is a process of its own: its policy loads the checkpoint from disk
    return _mel("run", "--config", "configs/tiny.yaml", "run.name=damaged", f"run.steps={steps}",
                f"run.root_dir={root}", f"model.name_or_path={micro_model}", "sampling.prompts_per_step=4",
                "sampling.group_size=2", "eval.every_n_steps=0")


def _counts(db: Path) -> dict:
    s = Store(db)
    return {t: s.query(f"SELECT count(*) AS n FROM {t}")[0]["n"]
            for t in ("checkpoints", "checkpoint_files", "updates", "rollouts", "steps")}


@pytest.fixture
def cli_env(monkeypatch):
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH", raising=False)


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_by_the_campaign_and_found_by_mel_verify(prefect_harness, tmp_path, capsys,
                                                                               cli_env, micro_model):
    root = tmp_path / "runs"
    run_dir = root / "damaged"
    assert _run(root, micro_model, 2) == 0
    db = run_dir / "mel.duckdb"
    with StoreReader(db) as r:
        written = {c["step"]: c for c in lineage.checkpoints_with_files(r)}
    assert sorted(written) == [0, 1, 2]
    assert written[0]["files"] == []  # the base model: no run wrote it
    for step in (1, 2):  # every file of each checkpoint a step wrote, as it is on disk
        on_disk = sorted(p.relative_to(written[step]["path"]).as_posix()
                         for p in Path(written[step]["path"]).rglob("*") if p.is_file())
        assert [f.file for f in written[step]["files"]] == on_disk
        assert {"model.safetensors", "optimizer.pt", "config.json"} <= set(on_disk)
    capsys.readouterr()
    assert _mel("verify", str(run_dir)) == 0
    assert capsys.readouterr().out.strip().endswith("not checked")  # 2 checked; the base named as not checked

    weights = Path(written[2]["path"]) / "model.safetensors"
    _flip(weights, weights.stat().st_size // 2)
    before = _counts(db)
    capsys.readouterr()
    assert _run(root, micro_model, 3) == 2  # extended by one step: it would train from step 2's weights
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"mel: checkpoint {written[2]['checkpoint_id']} is damaged, refusing to load it: {weights}:")
    assert _counts(db) == before  # nothing new recorded: no checkpoint, update, rollout or step
    assert not (Path(written[2]["path"]).parent / "step-00003").exists()
    failed = Store(db).query("SELECT stage, step, error FROM stage_runs WHERE status = 'failed'")
    assert len(failed) == 1 and failed[0]["error"].startswith("DamagedCheckpoint")  # refused once, not retried

    clear_runtimes()
    assert _mel("eval", "--checkpoint", written[2]["path"], "eval.k=0", "eval.max_problems=2") == 2  # nor scored
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"mel: checkpoint {written[2]['checkpoint_id']} is damaged, refusing to load it: {weights}:")
    assert Store(db).query("SELECT count(*) AS n FROM eval_samples")[0]["n"] == 0

    assert _mel("verify", str(run_dir)) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{weights}: its contents differ from when it was written (blake2b digest mismatch) "
                                f"(checkpoint {written[2]['checkpoint_id']}, step 2)"]
    assert err.startswith("mel: 1 of ") and "in 1 of 2 checkpoints" in err

    # A fork from step 1 carries step 1's recorded files into its own store: it checks its start too.
    with StoreReader(db) as r:
        copied = lineage.lineage_references(r, written[1]["checkpoint_id"], str(db))["checkpoint_files"]
    assert {c["checkpoint_id"] for c in copied} == {written[1]["checkpoint_id"]} and len(copied) == len(
        written[1]["files"])

    # A snapshot from before digests were recorded: nothing to check, and said so.
    old = tmp_path / "old" / "mel.duckdb"
    old.parent.mkdir()
    shutil.copy(db, old)
    shutil.copy(snapshot_path(db), snapshot_path(old))  # what a reader opens
    with duckdb.connect(str(snapshot_path(old))) as con:
        con.execute("DROP TABLE checkpoint_files")
    assert _mel("verify", str(old)) == 0
    assert "3 checkpoints without recorded files" in capsys.readouterr().out
