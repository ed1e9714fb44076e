"""run.async_save: each update's checkpoint is written by a background thread while the next step generates.

It must change nothing but when the bytes reach the disk: a host copy is the policy as it was when taken, written
byte for byte as a synchronous save writes it; an async and a sync campaign write the same records and bitwise the
same checkpoints; a background write that dies leaves nothing recorded of its step's update or of the next step —
a new flow run recomputes exactly that update and ends where an undisturbed run ends; and a campaign that fails for
another reason keeps the checkpoint being written. (A SIGKILL during a background save, in a process of its own:
tests/test_resume_kill.py.)
"""

import logging
from pathlib import Path

import pytest
import torch

from mel_core import config as config_mod
from mel_core.atomic_files import temp_name
from mel_core.model import async_save
from mel_core.model.checkpoints import OPTIMIZER_FILE, resolve_checkpoint_path
from mel_core.store.schema import TABLES
from mel_core.store.writer import Store
from tests.scripted import scripted_runtimes

pytestmark = pytest.mark.slow

STEPS = 3
# What differs between two runs of one campaign however it saves: clocks, where the run directory is, and the config
# text (run.async_save and run.root_dir, both outside the config hash: the run ids are the same).
VOLATILE = {"created_at", "started_at", "finished_at", "seconds", "path", "config_json"}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_host_copy_is_the_policy_as_it_was_when_taken(tmp_path, micro_model, tied):
    """What a background writer writes is the policy's state when the writer was made, whatever the optimizer did
    since; a writer that has not written yet keeps its buffers (the next copy takes fresh ones), a finished one gives
    them to the next copy; and the directory is byte for byte what a synchronous save of the same state writes — with
    a tied lm_head too (Qwen3's and SmolLM2's), which save_pretrained leaves out by finding it shares storage."""
    import copy

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mel_core.atomic_files import write_dir_atomically
    from mel_core.model.policy import Policy

    model_dir = micro_model
    if tied:
        model_dir = tmp_path / "tied-model"
        config = AutoConfig.from_pretrained(micro_model)
        config.tie_word_embeddings = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(micro_model).save_pretrained(model_dir)
    policy = Policy(config_mod.load("configs/tiny.yaml", [f"model.name_or_path={model_dir}"]), model_dir)
    assert (policy.model.lm_head.weight is policy.model.model.embed_tokens.weight) == tied
    generator = torch.Generator().manual_seed(0)

    def optimizer_step():
        for p in policy.model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        policy.optimizer.step()

    def now():
        return ({k: v.clone() for k, v in policy.model.state_dict().items()},
                copy.deepcopy(policy.optimizer.state_dict()))

    def assert_wrote(directory, expected):
        weights, optimizer = expected
        saved = load_file(directory / "model.safetensors")
        assert saved and all(torch.equal(saved[k], weights[k]) for k in saved)
        state = torch.load(directory / OPTIMIZER_FILE, weights_only=True)["state"]
        assert all(torch.equal(state[i][k], optimizer["state"][i][k]) for i in optimizer["state"] for k in state[i])

    optimizer_step()
    first, at_first = policy.checkpoint_writer({"step": 1}), now()
    optimizer_step()
    second, at_second = policy.checkpoint_writer({"step": 2}), now()  # the first has not written: fresh buffers
    optimizer_step()
    write_dir_atomically(tmp_path / "first", first)
    write_dir_atomically(tmp_path / "second", second)
    assert_wrote(tmp_path / "first", at_first)
    assert_wrote(tmp_path / "second", at_second)
    assert not torch.equal(at_first[0]["lm_head.weight"], at_second[0]["lm_head.weight"])
    assert ("lm_head.weight" in load_file(tmp_path / "first" / "model.safetensors")) == (not tied)

    buffers = [t.untyped_storage().data_ptr() for t in policy._host_copy[0].values()]
    third, at_third = policy.checkpoint_writer({"step": 3}), now()  # the second has written: its buffers again
    assert [t.untyped_storage().data_ptr() for t in policy._host_copy[0].values()] == buffers
    write_dir_atomically(tmp_path / "third", third)
    policy.save_checkpoint(tmp_path / "sync", update_stats={"step": 3})
    assert_wrote(tmp_path / "third", at_third)
    files = sorted(p.name for p in (tmp_path / "sync").iterdir())
    assert sorted(p.name for p in (tmp_path / "third").iterdir()) == files
    for name in files:
        if name != OPTIMIZER_FILE:
            assert (tmp_path / "third" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes(), name


def _campaign(root: Path, model, *overrides) -> dict:
    from flows.campaign import campaign

    cfg = config_mod.load("configs/tiny.yaml", [
        "run.name=saves", f"run.steps={STEPS}", f"run.root_dir={root}", f"model.name_or_path={model}",
        "sampling.prompts_per_step=4", "sampling.group_size=4", "eval.every_n_steps=2", "eval.max_problems=4",
        "eval.k=0", *overrides])
    with scripted_runtimes():  # mixed groups and accepted M: every step trains both terms and internalizes
        return campaign(config_mod.to_dict(cfg))


def _records(db) -> dict[str, list[dict]]:
    """Every table but the executions' log, without the columns VOLATILE names, rows in a fixed order."""
    s = Store(db)
    out = {}
    for table in TABLES:
        if table in ("meta", "stage_runs"):
            continue
        cols = [r["column_name"] for r in s.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table]) if r["column_name"] not in VOLATILE]
        out[table] = s.query(f"SELECT {', '.join(cols)} FROM {table} ORDER BY ALL")
    return out


def _checkpoint_dirs(db) -> dict[int, Path]:
    run_dir = Path(db).parent  # paths are stored relative to it (movable runs)
    return {r["step"]: resolve_checkpoint_path(r["path"], run_dir)
            for r in Store(db).query("SELECT step, path FROM checkpoints WHERE step > 0")}


def _assert_same_checkpoints(db, reference_db) -> None:
    """Every file of every step's checkpoint byte for byte; the optimizer state (a pickle) tensor for tensor."""
    got, want = _checkpoint_dirs(db), _checkpoint_dirs(reference_db)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        names = sorted(p.name for p in want[step].iterdir())
        assert sorted(p.name for p in got[step].iterdir()) == names
        for name in names:
            if name == OPTIMIZER_FILE:
                a, b = (torch.load(d / name, weights_only=True) for d in (got[step], want[step]))
                assert a["param_groups"] == b["param_groups"]
                assert a["state"].keys() == b["state"].keys()
                for i in a["state"]:
                    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in b["state"][i]), (step, i)
            else:
                assert (got[step] / name).read_bytes() == (want[step] / name).read_bytes(), (step, name)


def _completed(db) -> list[dict]:
    return Store(db).query("SELECT step, stage, count(*) AS n FROM stage_runs WHERE status = 'completed' "
                           "GROUP BY ALL ORDER BY ALL")


@pytest.fixture(scope="module")
def sync_run(prefect_harness, tmp_path_factory, micro_model) -> dict:
    """The campaign with checkpoints written in the update stage, as before run.async_save."""
    return _campaign(tmp_path_factory.mktemp("sync"), micro_model, "run.async_save=false")


def test_async_and_sync_campaigns_write_the_same_records_and_checkpoints(sync_run, tmp_path, micro_model, caplog):
    with caplog.at_level(logging.INFO, logger="mel"):
        result = _campaign(tmp_path, micro_model)  # run.async_save: true, the default
    background = [r.getMessage() for r in caplog.records if "written in the background" in r.getMessage()]
    assert len(background) == STEPS, "the checkpoints were not written in the background"

    assert _records(result["db"]) == _records(sync_run["db"])
    _assert_same_checkpoints(result["db"], sync_run["db"])
    assert result["final_checkpoint"].checkpoint_id == sync_run["final_checkpoint"].checkpoint_id
    # every stage ran once, and every step was reported with its update's metrics, in order
    assert _completed(result["db"]) == _completed(sync_run["db"])
    assert all(r["n"] == 1 for r in _completed(result["db"]))
    strip = lambda steps: [{k: v for k, v in s.items() if k != "stage_seconds"} for s in steps]
    assert strip(result["steps"]) == strip(sync_run["steps"])
    assert [s["step"] for s in result["steps"]] == list(range(1, STEPS + 1))
    assert all("loss" in s for s in result["steps"])
    evals = lambda run: [(e["step"], e["metrics"]) for e in run["evals"]]
    assert evals(result) == evals(sync_run)
    assert not list(Path(result["run_dir"]).glob("checkpoints/*/*.tmp-*"))


def test_a_background_save_that_dies_is_recomputed_on_resume(sync_run, tmp_path, micro_model, monkeypatch):
    """Step 1's write dies after filling part of its temp directory, as a process killed mid-save would leave it:
    the campaign fails at the next settle — step 2's sample, after its generation — with nothing of step 1's update
    or of step 2 recorded. A new flow run (a new runtime) recomputes step 1's update from the base checkpoint and
    ends with the undisturbed run's records and weights."""
    original = async_save._write

    def dies_mid_save(path, write):
        if not path.endswith("step-00001"):
            return original(path, write)
        tmp = temp_name(Path(path))
        write(tmp)  # the whole checkpoint into the temp directory, then half of its weights gone, and no rename
        weights = tmp / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        raise OSError(28, "No space left on device (simulated, mid-save)")

    monkeypatch.setattr(async_save, "_write", dies_mid_save)
    with pytest.raises(async_save.SaveFailed, match="checkpoint of step 1"):
        _campaign(tmp_path, micro_model)
    monkeypatch.undo()

    db = tmp_path / "saves" / "mel.duckdb"
    s = Store(db)
    n = lambda sql: s.query(sql)[0]["n"]
    assert n("SELECT count(*) AS n FROM updates") == 0
    assert n("SELECT count(*) AS n FROM checkpoints WHERE step > 0") == 0
    assert n("SELECT count(*) AS n FROM internalized") == 0
    assert n("SELECT count(*) AS n FROM metrics WHERE name = 'loss'") == 0
    for table in ("steps", "prompts", "rollouts", "metrics"):  # step 2 generated, and recorded nothing
        assert n(f"SELECT count(*) AS n FROM {table} WHERE step >= 2") == 0, table
    failed = s.query("SELECT step, stage, error FROM stage_runs WHERE status = 'failed'")
    assert [(r["step"], r["stage"]) for r in failed] == [(2, "sample")]  # permanent: not retried
    assert failed[0]["error"].startswith("SaveFailed: the checkpoint of step 1")
    left = list((tmp_path / "saves" / "checkpoints").glob("*/step-00001.tmp-*"))
    assert len(left) == 1 and not (left[0].parent / "step-00001").exists()

    result = _campaign(tmp_path, micro_model)
    assert _records(db) == _records(sync_run["db"])
    _assert_same_checkpoints(db, sync_run["db"])
    updates = Store(db).query("SELECT step, count(*) AS n FROM stage_runs WHERE stage = 'update' AND "
                              "status = 'completed' GROUP BY step ORDER BY step")
    assert updates == [{"step": 1, "n": 2}, {"step": 2, "n": 1}, {"step": 3, "n": 1}]  # step 1's, recomputed
    assert [s["step"] for s in result["steps"]] == list(range(1, STEPS + 1))
    assert not list((tmp_path / "saves" / "checkpoints").glob("*/*.tmp-*"))  # its own temp: removed by the rewrite


@pytest.mark.parametrize("write", ["succeeds", "dies"])
def test_a_failed_campaign_keeps_the_checkpoint_being_written(prefect_harness, tmp_path, micro_model, monkeypatch,
                                                              capsys, write):
    """A campaign that fails while step 1's checkpoint is still being written (step 2's sample refused before its
    body, so nothing else settles it) waits for the write in its failure path and commits step 1's rows: the rerun
    need not recompute that update. If that write dies too, the campaign still fails with its own error, the write's
    is announced, and nothing of step 1's update is recorded."""
    from mel_core.errors import InjectedPermanentFault

    def dies(path, write):
        raise OSError(5, "Input/output error (simulated)")

    if write == "dies":
        monkeypatch.setattr(async_save, "_write", dies)
    refused = "orchestration.faults=[{stage: sample, step: 2, when: before, kind: permanent}]"
    with pytest.raises(InjectedPermanentFault, match="permanent fault in sample"):
        _campaign(tmp_path, micro_model, refused)
    s = Store(tmp_path / "saves" / "mel.duckdb")
    kept = write == "succeeds"
    assert s.query("SELECT step FROM updates") == ([{"step": 1}] if kept else [])
    assert s.query("SELECT count(*) AS n FROM checkpoints WHERE step = 1")[0]["n"] == int(kept)
    assert len(list((tmp_path / "saves").glob("checkpoints/*/step-00001"))) == int(kept)
    assert ("mel: SaveFailed: the checkpoint of step 1" in capsys.readouterr().out) == (not kept)
