"""A real 2-step MEL campaign under prefect_test_harness: every stage, record and evaluation.

What the policy says is constructed (tests/scripted.py: mixed groups, parseable analyses, replays that
solve), so every table fills on every machine; the micro model trains for real and the stores, flows,
caches and checkpoints are the real ones.
"""

import pytest
import torch
from safetensors.torch import load_file

from mel_core import config as config_mod
from mel_core.runtime import clear_runtimes
from mel_core.store import TABLES, Store
from tests.scripted import scripted_runtimes

pytestmark = pytest.mark.slow


def _overrides(root, micro_model) -> list[str]:
    return ["run.name=e2e", "run.steps=2", f"run.root_dir={root}", f"model.name_or_path={micro_model}",
            "sampling.prompts_per_step=8", "sampling.group_size=4", "eval.every_n_steps=1", "eval.max_problems=8",
            "eval.k=2"]


@pytest.fixture(scope="module")
def campaign_run(prefect_harness, tmp_path_factory, micro_model):
    from flows.campaign import campaign

    root = tmp_path_factory.mktemp("runs")
    cfg = config_mod.load("configs/tiny.yaml", _overrides(root, micro_model))
    with scripted_runtimes():
        result = campaign(config_mod.to_dict(cfg))
    return cfg, result


def test_every_table_has_rows(campaign_run):
    _, result = campaign_run
    counts = Store(result["db"]).counts()
    empty = [t for t in TABLES if counts[t] == 0 and t != "rewards"]  # rewards: written by `mel rescore` only
    assert not empty, f"empty tables: {empty} (counts {counts})"
    assert counts["updates"] == 2 and counts["checkpoints"] == 3  # base + one per step


def test_an_accepted_heuristic_has_a_complete_lineage(campaign_run):
    _, result = campaign_run
    rows = Store(result["db"]).query(
        "SELECT * FROM heuristic_lineage WHERE accepted AND internalized_in_checkpoint IS NOT NULL")
    assert rows, "no heuristic was accepted and internalized"
    for r in rows:
        for col in ("analysis_id", "pair_id", "correct_text", "incorrect_text", "question", "answer",
                    "policy_version_id", "run_id", "internalized_by_update"):
            assert r[col] is not None, col
        assert r["heuristic"].lower().startswith("if")


def test_stage_records_are_consistent(campaign_run):
    _, result = campaign_run
    s = Store(result["db"])
    # the correct side of every pair verified, the incorrect side did not
    bad = s.query("SELECT count(*) AS n FROM pairs p JOIN rollouts c ON c.rollout_id = p.correct_rollout_id "
                  "JOIN rollouts i ON i.rollout_id = p.incorrect_rollout_id WHERE c.reward <= 0 OR i.reward > 0")
    assert bad[0]["n"] == 0
    # every stage of every step executed exactly once and completed
    runs = s.query("SELECT step, stage, count(*) AS n, bool_and(status = 'completed') AS ok FROM stage_runs "
                   "WHERE stage != 'warm_start' GROUP BY ALL")
    assert len(runs) == 14 and all(r["n"] == 1 and r["ok"] for r in runs)
    # an accepted analysis has at least one verified replay; a rejected one says why
    assert s.query("SELECT count(*) AS n FROM analyses WHERE status = 'rejected' AND reject_reason IS NULL")[0]["n"] == 0


def test_the_campaign_evaluates_the_base_and_every_step(campaign_run):
    _, result = campaign_run
    s = Store(result["db"])
    rows = s.query("SELECT e.step, e.checkpoint_id, c.step AS checkpoint_step, e.pass_at_1, e.num_problems "
                   "FROM heldout_accuracy e JOIN checkpoints c USING (checkpoint_id) ORDER BY e.step")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["checkpoint_step"] == r["step"] and r["num_problems"] == 8 for r in rows)
    assert [e["checkpoint_id"] for e in result["evals"]] == [r["checkpoint_id"] for r in rows]
    assert rows[-1]["checkpoint_id"] == result["final_checkpoint"]["checkpoint_id"]


def test_checkpoint_after_update_differs(campaign_run):
    _, result = campaign_run
    s = Store(result["db"])
    ckpts = s.query("SELECT step, path FROM checkpoints ORDER BY step")
    before = load_file(f"{ckpts[0]['path']}/model.safetensors")
    after = load_file(f"{ckpts[1]['path']}/model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_rerunning_the_campaign_adds_no_rows(campaign_run):
    from flows.campaign import campaign

    cfg, result = campaign_run
    before = Store(result["db"]).counts()
    clear_runtimes()
    again = campaign(config_mod.to_dict(cfg))
    after = Store(result["db"]).counts()
    assert after == before  # every stage was a cache hit: no new rows, no new stage executions
    assert again["final_checkpoint"] == result["final_checkpoint"]


def test_a_fork_campaign_runs_the_steps_after_its_fork_point(campaign_run, micro_model):
    """`mel run --fork e2e@1` as the flow runs it: no warm start, the parent's checkpoint evaluated as step 1, one
    step numbered 2 whose update trains on from the parent's step-1 checkpoint."""
    from flows.campaign import campaign
    from mel_core import fork

    cfg, result = campaign_run
    point = fork.find_fork_point(f"{result['run_dir']}@1", cfg.run.root_dir)
    child_cfg = fork.fork_config("configs/tiny.yaml", _overrides(cfg.run.root_dir, micro_model) + ["loss.nll_coef=0.5"],
                                 point)
    clear_runtimes()
    with scripted_runtimes():
        child = campaign(config_mod.to_dict(child_cfg))
    s = Store(child["db"])
    assert child["db"] != result["db"]
    ran = s.query("SELECT DISTINCT step, stage FROM stage_runs WHERE run_id = ? ORDER BY ALL", [child["run_id"]])
    assert {r["step"] for r in ran} == {2} and "warm_start" not in {r["stage"] for r in ran}
    evals = s.query("SELECT step, checkpoint_id FROM heldout_accuracy WHERE run_id = ? ORDER BY step",
                    [child["run_id"]])
    assert [(e["step"], e["checkpoint_id"]) for e in evals] == [(1, point.checkpoint_id),
                                                                (2, child["final_checkpoint"]["checkpoint_id"])]
    final = s.query("SELECT step, parent_checkpoint_id FROM checkpoints WHERE checkpoint_id = ?",
                    [child["final_checkpoint"]["checkpoint_id"]])[0]
    assert (final["step"], final["parent_checkpoint_id"]) == (2, point.checkpoint_id)
