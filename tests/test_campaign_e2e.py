"""A real 2-step MEL campaign under prefect_test_harness: every stage, record and evaluation.

What the policy says is constructed (tests/scripted.py: mixed groups, parseable analyses, replays that
solve), so every table fills on every machine; the micro model trains for real and the stores, flows,
caches and checkpoints are the real ones.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mel_core import config as config_mod
from mel_core.model.checkpoints import resolve_checkpoint_path
from mel_core.step.runtime import clear_runtimes
from mel_core.store.schema import TABLES
from mel_core.store.writer import Store
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
    cfg = config_mod.load("configs/tiny.yaml", _overrides(root, micro_model) + ["logging.report_to=[tensorboard,mlflow]"])
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
    assert rows[-1]["checkpoint_id"] == result["final_checkpoint"].checkpoint_id


def test_checkpoint_after_update_differs(campaign_run):
    _, result = campaign_run
    s = Store(result["db"])
    ckpts = s.query("SELECT step, path FROM checkpoints ORDER BY step")
    run_dir = Path(result["db"]).parent  # a run's own checkpoints are recorded relative to its directory
    before = load_file(f"{resolve_checkpoint_path(ckpts[0]['path'], run_dir)}/model.safetensors")
    after = load_file(f"{resolve_checkpoint_path(ckpts[1]['path'], run_dir)}/model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _tensorboard(result) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the campaign's TensorBoard event files hold: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(f"{result['run_dir']}/tracking/tensorboard/{result['run_id']}")
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_trackers_get_every_step_and_evaluation_of_the_store(campaign_run):
    from mlflow.tracking import MlflowClient

    _, result = campaign_run
    s = Store(result["db"])
    rewards = [(r["step"], r["value"]) for r in s.query(
        "SELECT step, value FROM metrics WHERE name = 'reward_mean' ORDER BY step")]
    greedy = [(r["step"], r["value"]) for r in s.query(
        "SELECT step, value FROM evals WHERE metric = 'pass@1' ORDER BY step")]
    assert len(rewards) == 2 and len(greedy) == 3
    tb = _tensorboard(result)
    assert [(st, pytest.approx(v)) for st, v in rewards] == tb["train/reward_mean"]
    assert [(st, pytest.approx(v)) for st, v in greedy] == tb["eval/synthetic/pass@1"]
    assert [st for st, _ in tb["time/update"]] == [1, 2]

    client = MlflowClient(f"sqlite:///{result['run_dir']}/tracking/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("mel").experiment_id])
    assert run.info.run_name == result["run_id"] and run.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/synthetic/pass_at_1")) \
        == greedy
    assert run.data.params["run.name"] == '"e2e"'


def test_the_campaign_links_its_report_and_summarises_itself(campaign_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, result = campaign_run
    with get_client(sync_client=True) as client:
        (link,) = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mel-e2e-report"])))
        (summary,) = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mel-e2e-campaign-summary"])))
    report = f"{result['run_dir']}/report/report.md"
    assert link.type == "markdown" and f"(file://{report})" in link.data  # a link artifact renders as markdown
    assert "## Held-out accuracy" in open(report).read()  # mel report's markdown, written at the campaign's end
    base, last = result["evals"][0]["metrics"]["pass@1"], result["evals"][-1]["metrics"]["pass@1"]
    assert f"| synthetic | pass@1 | {base:.3f} (step 0) | {last:.3f} (step 2) |" in summary.data
    accepted = int(sum(st["accepted"] for st in result["steps"]))
    candidates = int(sum(st["candidates"] for st in result["steps"]))
    assert candidates > 0 and f"| {accepted} | {candidates} | {accepted / candidates:.2f} |" in summary.data


def test_rerunning_the_campaign_adds_no_rows(campaign_run, capsys):
    from flows.campaign import campaign

    cfg, result = campaign_run
    before = Store(result["db"]).counts()
    clear_runtimes()
    capsys.readouterr()
    again = campaign(config_mod.to_dict(cfg))
    after = Store(result["db"]).counts()
    assert after == before  # every stage was a cache hit: no new rows, no new stage executions
    assert again["final_checkpoint"] == result["final_checkpoint"]
    step_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2 and all(line.endswith(" | cached") for line in step_lines)  # marked as walked past


def test_a_fork_campaign_runs_the_steps_after_its_fork_point(campaign_run, micro_model):
    """`mel run --fork e2e@1` as the flow runs it: no warm start, the parent's checkpoint evaluated as step 1, one
    step numbered 2 whose update trains on from the parent's step-1 checkpoint."""
    from flows.campaign import campaign
    from mel_core.run import fork

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
                                                                (2, child["final_checkpoint"].checkpoint_id)]
    final = s.query("SELECT step, parent_checkpoint_id FROM checkpoints WHERE checkpoint_id = ?",
                    [child["final_checkpoint"].checkpoint_id])[0]
    assert (final["step"], final["parent_checkpoint_id"]) == (2, point.checkpoint_id)

def test_trackers_hold_each_step_once_after_the_rerun(campaign_run):
    """Runs after test_rerunning_the_campaign_adds_no_rows: the rerun walked both steps again (cache hits)."""
    _, result = campaign_run
    tb = _tensorboard(result)
    assert [st for st, _ in tb["train/reward_mean"]] == [1, 2]
    assert [st for st, _ in tb["eval/synthetic/pass@1"]] == [0, 1, 2]
