"""Retries under fault injection (orchestration.faults), on one micro campaign under real Prefect.

A transient failure injected into each of the seven stages — after its body has written its records,
the harder case — is retried, the step completes, and no row is duplicated. A permanent failure is
not retried: the campaign fails at once with its message.
"""

import pytest

from mel_core import config as config_mod
from mel_core.errors import InjectedPermanentFault
from mel_core.store.writer import Store
from mel_core.vocabulary import STAGES
from tests.scripted import scripted_runtimes

pytestmark = pytest.mark.slow

B, G = 4, 4


def _config(root, name, model, *overrides):
    return config_mod.load("configs/tiny.yaml", [
        f"run.name={name}", "run.steps=1", f"run.root_dir={root}", f"model.name_or_path={model}",
        f"sampling.prompts_per_step={B}", f"sampling.group_size={G}", "orchestration.default.retry_delay_s=0",
        *overrides])


def _faults(kind, when, stages):
    return "orchestration.faults=[" + ", ".join(
        f"{{stage: {s}, step: 1, when: {when}, kind: {kind}}}" for s in stages) + "]"


def test_one_transient_fault_in_every_stage_is_retried_without_duplicates(prefect_harness, tmp_path, micro_model):
    from flows.campaign import campaign

    cfg = _config(tmp_path, "faults", micro_model, _faults("transient", "after", STAGES))
    with scripted_runtimes():  # mixed groups and accepted M: every stage has records to duplicate
        result = campaign(config_mod.to_dict(cfg))
    s = Store(result["db"])

    runs = s.query("SELECT stage, list(status ORDER BY started_at) AS statuses, "
                   "list(error ORDER BY started_at) AS errors FROM stage_runs WHERE step = 1 GROUP BY stage")
    by_stage = {r["stage"]: r for r in runs}
    assert set(by_stage) == set(STAGES)
    for stage, r in by_stage.items():  # failed once after writing, then retried to completion
        assert r["statuses"] == ["failed", "completed"], (stage, r)
        assert r["errors"][0].startswith("InjectedFault: injected transient fault in " + stage), r["errors"]
    assert result["steps"][0]["step"] == 1 and result["final_checkpoint"].checkpoint_id

    # No duplicates: every table holds exactly the rows its ids imply, once.
    n = lambda sql: s.query(sql)[0]["n"]
    assert n("SELECT count(*) AS n FROM prompts") == B
    assert n("SELECT count(*) AS n FROM rollouts") == B * G
    assert n("SELECT count(DISTINCT (prompt_id, sample_index)) AS n FROM rollouts") == B * G
    mixed = n("SELECT count(*) AS n FROM (SELECT prompt_id FROM rollouts GROUP BY prompt_id "
              "HAVING bool_or(reward > 0) AND bool_or(reward <= 0))")
    assert mixed > 0, "no mixed group: the fault in diagnose/abstract/replay was not exercised"
    assert n("SELECT count(*) AS n FROM pairs") == mixed  # pairs_per_group = 1
    assert n("SELECT count(*) AS n FROM analyses") == n("SELECT count(DISTINCT pair_id) AS n FROM analyses") == mixed
    assert n("SELECT count(*) AS n FROM heuristics") == n(
        "SELECT count(DISTINCT (analysis_id, position)) AS n FROM heuristics")
    assert n("SELECT count(*) AS n FROM replays") == n(
        "SELECT count(DISTINCT analysis_id) AS n FROM heuristics")  # replays_per_experience = 1
    assert n("SELECT count(*) AS n FROM updates") == 1 and n("SELECT count(*) AS n FROM steps") == 1
    assert n("SELECT count(*) AS n FROM checkpoints") == 2  # the warm start and step 1's
    assert n("SELECT count(*) AS n FROM internalized") == n(
        "SELECT count(*) AS n FROM heuristics h JOIN analyses a USING (analysis_id) WHERE a.status = 'accepted'")
    # the live acceptance view agrees with the metrics the replay stage wrote
    view = s.query("SELECT accepted, retention_ratio FROM step_acceptance WHERE step = 1")[0]
    summary = s.query("SELECT accepted, retention_ratio FROM step_summary WHERE step = 1")[0]
    assert view["accepted"] == summary["accepted"]
    assert view["retention_ratio"] == pytest.approx(summary["retention_ratio"])


def test_a_permanent_fault_fails_at_once_without_retry(prefect_harness, tmp_path, micro_model):
    from flows.campaign import campaign

    cfg = _config(tmp_path, "permanent", micro_model, _faults("permanent", "before", ["verify"]))
    with scripted_runtimes(), pytest.raises(InjectedPermanentFault, match="permanent fault in verify"):
        campaign(config_mod.to_dict(cfg))
    s = Store(tmp_path / "permanent" / "mel.duckdb")
    runs = s.query("SELECT stage, status FROM stage_runs WHERE step = 1 ORDER BY started_at")
    assert runs == [{"stage": "sample", "status": "completed"}, {"stage": "verify", "status": "failed"}]
    assert s.query("SELECT count(*) AS n FROM rollouts WHERE reward IS NOT NULL")[0]["n"] == 0
