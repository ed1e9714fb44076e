"""Who writes the meta-experience, and what MEL does with it: the analyst choice (policy, a teacher model, the
world's oracle, mismatched lessons), the grpo+sft target, the no-filter control and transfer replays — each on a
constructed step (tests/scripted.py), with the real parser, replay, store and update."""

import pytest
import torch

from mel_core import config as C
from mel_core.algorithm import losses
from mel_core.model.policy import Policy
from mel_core.problems.worlds import arithmetic
from tests.conftest import build_micro_model
from tests.scripted import Script, run_step, scripted_runtime, typed_error


def _run(tmp_path, micro_model, name, script, *more):
    cfg = C.load("configs/tiny.yaml", [f"run.name={name}", f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}",
                                       "sampling.prompts_per_step=6", "sampling.group_size=4", *more])
    rt, base = scripted_runtime(cfg, script)
    run_step(rt, 1, base)
    return rt


def test_the_oracle_writes_the_true_lesson_of_each_typed_error(tmp_path, micro_model):
    script = Script(wrong=typed_error)
    rt = _run(tmp_path, micro_model, "oracle", script, "experience.analyst=oracle")
    rows = rt.store.query("SELECT a.*, r.text AS incorrect, pr.question FROM analyses a JOIN pairs p USING (pair_id) "
                          "JOIN rollouts r ON r.rollout_id = p.incorrect_rollout_id JOIN prompts pr "
                          "ON pr.prompt_id = p.prompt_id")
    assert rows and all(r["analyst"] == "oracle" for r in rows)
    for r in rows:
        expected = arithmetic.oracle_analysis(r["question"], r["incorrect"].splitlines())
        if expected is None:  # no typed error applied to this question: the oracle knows no lesson for it
            assert r["reject_reason"] == "no_known_error"
        else:
            assert r["raw_text"] == expected and r["status"] == "accepted"
    assert any(r["status"] == "accepted" for r in rows)
    assert not any("Analysis:" in p for p in script.seen)  # the policy wrote no analysis


def test_mismatched_lessons_are_another_rules_of_the_nearest_length(tmp_path, micro_model):
    rt = _run(tmp_path, micro_model, "mismatched", Script(wrong=typed_error), "experience.analyst=mismatched")
    rows = rt.store.query("SELECT a.raw_text, r.text AS incorrect, pr.question FROM analyses a JOIN pairs p "
                          "USING (pair_id) JOIN rollouts r ON r.rollout_id = p.incorrect_rollout_id "
                          "JOIN prompts pr ON pr.prompt_id = p.prompt_id WHERE a.reject_reason IS DISTINCT FROM "
                          "'no_known_error'")
    assert rows
    lessons = arithmetic.ERROR_TYPES
    for r in rows:
        true = arithmetic.oracle_analysis(r["question"], r["incorrect"].splitlines()).splitlines()
        written = r["raw_text"].splitlines()
        assert written[:2] == true[:2]  # the same failure point and critique
        true_lesson, lesson = true[2].removeprefix("Heuristic: "), written[2].removeprefix("Heuristic: ")
        assert lesson != true_lesson and lesson in lessons.values()
        nearest = min(abs(len(x) - len(true_lesson)) for x in lessons.values() if x != true_lesson)
        assert abs(len(lesson) - len(true_lesson)) == nearest


def test_a_teacher_model_writes_the_analyses_the_policy_does_not(tmp_path, micro_model):
    teacher = build_micro_model(tmp_path / "teacher", num_layers=1)
    script = Script()
    rt = _run(tmp_path, micro_model, "teacher", script, f"experience.analyst=model:{teacher}",
              "experience.analysis_max_new_tokens=12")
    rows = rt.store.query("SELECT analyst, raw_text, token_ids FROM analyses")
    assert rows and {r["analyst"] for r in rows} == {f"model:{teacher}"}
    assert not any("Analysis:" in p for p in script.seen)  # the policy's engine got no analysis prompt
    assert all(len(r["token_ids"]) >= 1 for r in rows)  # the teacher generated them (random text: rejected)


def test_grpo_sft_trains_on_the_correct_rollouts_of_the_accepted_pairs(tmp_path, micro_model):
    rt = _run(tmp_path, micro_model, "sft", Script(), "experience.nll_target=correct_rollout", "optim.lr=1e-3")
    accepted = rt.store.query("SELECT p.prompt_text, r.token_ids FROM analyses a JOIN pairs pa USING (pair_id) "
                              "JOIN rollouts r ON r.rollout_id = pa.correct_rollout_id JOIN prompts p "
                              "ON p.prompt_id = pa.prompt_id WHERE a.status = 'accepted'")
    update = rt.store.query("SELECT nll_loss, num_nll_sequences FROM updates")[0]
    assert update["num_nll_sequences"] == len(accepted) == 6
    # the logged NLL is the starting policy's NLL of exactly those rollouts given their solve prompts
    base = Policy(rt.cfg, micro_model)
    ids, attn, mask, _ = base.encode([a["prompt_text"] for a in accepted], [a["token_ids"] for a in accepted])
    with torch.no_grad():
        expected, _ = losses.nll_loss(losses.per_token_logps(base.model, ids, attn, mask.size(1), 1.0), mask)
    assert update["nll_loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_without_the_filter_every_candidate_is_kept_and_its_replay_still_recorded(tmp_path, micro_model):
    rt = _run(tmp_path, micro_model, "nofilter", Script(replay_solves=lambda q: False), "experience.filter=none")
    statuses = {r["status"] for r in rt.store.query("SELECT status FROM analyses")}
    assert statuses == {"accepted"}
    assert rt.store.query("SELECT count(*) AS n, sum(reward) AS r FROM replays")[0] == {"n": 6, "r": 0.0}
    m = {r["name"]: r["value"] for r in rt.store.query("SELECT name, value FROM metrics")}
    assert m["accepted"] == 6 and m["replay_passed"] == 0


def test_transfer_replays_keep_only_lessons_that_do_no_worse_on_other_problems(tmp_path, micro_model):
    """One question's replay solves, no other does: its lesson passes its own replay and fails on the others of
    its cluster (their rollouts solved half), so transfer_replays rejects it; without transfer it is kept."""
    probe = _run(tmp_path / "probe", micro_model, "probe", Script())
    special = sorted(r["question"] for r in probe.store.query("SELECT question FROM prompts"))[0]
    only_one = Script(replay_solves=lambda q: q == special)
    plain = _run(tmp_path / "plain", micro_model, "plain", only_one)
    assert [r["question"] for r in plain.store.query(
        "SELECT pr.question FROM analyses a JOIN pairs USING (pair_id) JOIN prompts pr USING (prompt_id) "
        "WHERE a.status = 'accepted'")] == [special]
    rt = _run(tmp_path / "transfer", micro_model, "transfer", Script(replay_solves=lambda q: q == special),
              "experience.transfer_replays=2")
    reasons = {r["question"]: r["reject_reason"] for r in rt.store.query(
        "SELECT pr.question, a.reject_reason FROM analyses a JOIN pairs USING (pair_id) JOIN prompts pr USING (prompt_id)")}
    assert reasons[special] == "transfer_failed" and set(reasons.values()) == {"transfer_failed", "replay_failed"}
    transfer = rt.store.query("SELECT count(*) AS n FROM replays WHERE kind = 'transfer'")[0]["n"]
    assert transfer == 2 * 6  # every candidate shares its (one) lesson's cluster with the five others: k = 2 each
    m = {r["name"]: r["value"] for r in rt.store.query("SELECT name, value FROM metrics")}
    assert m["transfer_rejected"] == 1 and m["accepted"] == 0


def test_a_weak_rule_pool_swaps_a_lesson_only_for_another_weak_rules():
    from mel_core.problems import worlds
    from mel_core.problems.worlds import rules
    from mel_core.step import analysts

    cfg = C.load("configs/tiny-rules.yaml", ["experience.analyst=mismatched", "experience.mismatch_pool=weak_rules"])
    weak, world = set(cfg.data.synthetic.rules.weak_rules), worlds.get("rules")
    pool = analysts.mismatch_pool(cfg, world)
    assert set(pool) == weak and len(weak) >= 2
    for rule in weak:
        analysis = f"Bifurcation: step 2\nCritique: wrong rule.\nHeuristic: {rules.ERROR_TYPES[rule]}"
        lesson = analysts.mismatch(analysis, pool).splitlines()[2].removeprefix("Heuristic: ")
        everywhere = analysts.mismatch(analysis, analysts.mismatch_pool(C.load("configs/tiny-rules.yaml"), world))
        assert lesson != rules.ERROR_TYPES[rule] and lesson in {rules.ERROR_TYPES[w] for w in weak - {rule}}
        assert everywhere.splitlines()[2].removeprefix("Heuristic: ") in rules.ERROR_TYPES.values()
    assert any(analysts.mismatch(f"Heuristic: {rules.ERROR_TYPES[r]}", analysts.mismatch_pool(
        C.load("configs/tiny-rules.yaml"), world)).removeprefix("Heuristic: ") not in
        {rules.ERROR_TYPES[w] for w in weak} for r in weak)  # the default pool does reach the strong rules' lessons
    with pytest.raises(C.ConfigError, match="experience.mismatch_pool"):
        C.load("configs/tiny-rules.yaml", ["experience.mismatch_pool=weak_rules"])  # the analyst is the policy
    with pytest.raises(C.ConfigError, match="experience.mismatch_pool"):
        C.load("configs/tiny.yaml", ["experience.analyst=mismatched", "experience.mismatch_pool=weak_rules"])
