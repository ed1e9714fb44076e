"""The A/B harness: the paired bootstrap on data with a known difference, and a tiny end-to-end `mel compare`."""

import json

import numpy as np
import pytest

from mel_core import config as C
from mel_core.store.writer import Store
from mel_core.study import ab_test as cmp
from tests.scripted import scripted_runtimes


def _paired(rng, seeds: int, problems: int, delta: float) -> np.ndarray:
    """Binary outcomes, per-problem difficulty shared by both arms and all seeds; MEL solves with p + delta."""
    p = rng.uniform(0.1, 0.8, size=problems)
    grpo = rng.random((seeds, problems)) < p
    mel = rng.random((seeds, problems)) < p + delta
    return mel.astype(float) - grpo.astype(float)


def test_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(0)
    covered = 0
    for t in range(20):
        ci = cmp.paired_bootstrap(_paired(rng, 3, 200, 0.1), n_resamples=2000, seed=t)
        assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
        covered += ci["ci_low"] <= 0.1 <= ci["ci_high"]
    assert covered >= 18  # nominal 95% (the crossed bootstrap is conservative)
    null = cmp.paired_bootstrap(np.zeros((3, 50)), n_resamples=500)
    assert null["ci_low"] == null["ci_high"] == null["mean"] == 0.0


def test_bootstrap_width_shrinks_with_more_problems_and_seeds():
    rng = np.random.default_rng(1)
    width = lambda s, p: np.mean([(lambda c: c["ci_high"] - c["ci_low"])(
        cmp.paired_bootstrap(_paired(rng, s, p, 0.1), n_resamples=2000, seed=i)) for i in range(5)])
    w50, w800 = width(3, 50), width(3, 800)
    assert w800 < w50 / 2.5  # ~ 1/sqrt(P): a factor 4 at 16x the problems
    assert width(12, 100) < width(2, 100)


def test_bootstrap_keeps_the_pairing():
    # Problem difficulty varies wildly but MEL is exactly one problem-in-ten better on every seed: the paired
    # difference has little spread, so the CI is narrow although each arm's own accuracy is uncertain.
    d = np.zeros((3, 100))
    d[:, ::10] = 1.0
    ci = cmp.paired_bootstrap(d, n_resamples=2000)
    assert ci["mean"] == pytest.approx(0.1)
    assert 0.03 < ci["ci_low"] < 0.1 < ci["ci_high"] < 0.17
    with pytest.raises(ValueError):
        cmp.paired_bootstrap(np.zeros(5))


def test_arm_configs_differ_only_in_what_mel_adds():
    cfg = C.load("configs/tiny.yaml", ["run.steps=4"])
    arms = cmp.plan(cfg, "ab", 2)
    assert [(a.arm, a.seed) for a in arms] == [("grpo", 0), ("mel", 0), ("mel", 1), ("grpo", 1)]
    by = {(a.arm, a.seed): C.to_dict(a.config) for a in arms}
    g, m = by[("grpo", 1)], by[("mel", 1)]
    assert (g["experience"]["enabled"], g["loss"]["nll_coef"]) == (False, 0.0)
    assert (m["experience"]["enabled"], m["loss"]["nll_coef"]) == (True, 1.0)
    assert (g["run"]["name"], m["run"]["name"], g["run"]["seed"]) == ("ab-grpo-s1", "ab-mel-s1", 1)
    assert g["eval"]["every_n_steps"] == 4  # eval.every_n_steps 0: base and last step only
    for d in (g, m):
        d.pop("experience"), d.pop("loss"), d["run"].pop("name")
    assert g == m
    with pytest.raises(C.ConfigError, match="nll_coef"):
        cmp.plan(C.load("configs/tiny.yaml", ["loss.nll_coef=0"]), "ab", 1)


def test_control_arms_change_only_their_own_keys():
    cfg = C.load("configs/tiny.yaml", ["run.steps=2"])
    arms = cmp.plan(cfg, "ab", 1, cmp.parse_arms("mel-oracle,grpo+sft,mel-mismatched,mel-nofilter,mel-transfer,mel,"
                                                  "mel-distill,mel-heuristics,mel-unquoted,grpo+gold"))
    # grpo first: the baseline every difference is taken to; grpo+sft just after the mel arm it is count-matched to
    assert [a.arm for a in arms] == ["grpo", "mel-oracle", "mel-mismatched", "mel-nofilter", "mel-transfer", "mel",
                                     "grpo+sft", "mel-distill", "mel-heuristics", "mel-unquoted", "grpo+gold"]
    by = {a.arm: C.to_dict(a.config) for a in arms}
    assert by["grpo+sft"]["run"]["name"] == "ab-grpo-sft-s0"
    assert by["mel-distill"]["experience"]["nll_target"] == "accepted_replay"
    assert by["mel-heuristics"]["experience"]["nll_parts"] == "heuristics"
    assert by["mel-unquoted"]["experience"]["mask_quoted_solution"] is True
    assert by["mel-oracle"]["experience"]["analyst"] == "oracle"
    assert by["mel-mismatched"]["experience"]["analyst"] == "mismatched"
    assert by["grpo+sft"]["experience"]["nll_target"] == "correct_rollout"
    assert by["grpo+gold"]["experience"]["nll_target"] == "reference_solution"
    assert by["mel-nofilter"]["experience"]["filter"] == "none"
    assert by["mel-transfer"]["experience"]["transfer_replays"] == 2
    base = C.to_dict(C.load("configs/tiny.yaml", ["run.steps=2"]))["experience"]
    for arm, d in by.items():
        changed = {k for k, v in d["experience"].items() if v != base[k]}
        expected = {k.split(".")[1] for k in cmp.ARM_OVERRIDES[arm] if k.startswith("experience.")}
        assert changed <= expected, (arm, changed)
    with pytest.raises(C.ConfigError, match="unknown arm"):
        cmp.parse_arms("mel,ppo")
    with pytest.raises(C.ConfigError, match="experience.mismatch_pool"):  # the arithmetic world has no weak rules
        cmp.plan(cfg, "ab", 1, cmp.parse_arms("mel-mismatched-weak"))
    rules = cmp.plan(C.load("configs/tiny-rules.yaml", ["run.steps=2"]), "ab", 1, cmp.parse_arms("mel-mismatched-weak"))
    weak = C.to_dict(rules[1].config)["experience"]
    assert (weak["analyst"], weak["mismatch_pool"]) == ("mismatched", "weak_rules")


def test_grpo_sft_is_pointed_at_the_mel_run_of_its_seed():
    cfg = C.load("configs/tiny.yaml", ["run.steps=2"])
    for arm in ("grpo+sft", "grpo+gold"):
        with pytest.raises(C.ConfigError, match="add mel"):
            cmp.plan(cfg, "ab", 1, cmp.parse_arms(arm))
    arms = cmp.plan(cfg, "ab", 2, cmp.parse_arms("grpo+sft,mel"))
    for seed in (0, 1):  # the rotation of arms never puts grpo+sft before its mel
        order = [a.arm for a in arms if a.seed == seed]
        assert order.index("mel") < order.index("grpo+sft")
    sft = next(a for a in arms if a.arm == "grpo+sft" and a.seed == 1)
    finished = {("mel", 0): cmp.ArmRun("mel", 0, "ab-mel-s0", "run-a", "/x/a.duckdb", "c"),
                ("mel", 1): cmp.ArmRun("mel", 1, "ab-mel-s1", "run-b", "/x/b.duckdb", "c")}
    matched = cmp.count_matched(sft, finished).experience
    assert (matched.count_match_run_id, matched.count_match_store) == ("run-b", "/x/b.duckdb")
    assert C.step_stages(cmp.count_matched(sft, finished)) == ("sample", "verify", "pair", "update")
    gold = next(a for a in cmp.plan(cfg, "ab", 2, cmp.parse_arms("grpo+gold,mel")) if a.arm == "grpo+gold" and a.seed == 1)
    assert cmp.count_matched(gold, finished).experience.count_match_run_id == "run-b"
    assert C.step_stages(cmp.count_matched(gold, finished)) == ("sample", "verify", "update")
    mel = next(a for a in arms if a.arm == "mel")
    assert cmp.count_matched(mel, finished) is mel.config  # any other arm runs as planned
    with pytest.raises(C.ConfigError, match="run first"):
        cmp.count_matched(sft, {("mel", 0): finished[("mel", 0)]})


def test_equal_time_reads_the_arm_at_grpos_training_time_between_two_evaluations():
    # GRPO trains 4 steps of 1 s (budget 4 s); the arm's steps take 1.5 s: 4 s is 1/3 of the way from its
    # evaluation at step 2 (3 s) to the one at step 4 (6 s)
    steps = lambda secs: [{"step": i + 1, "seconds": x} for i, x in enumerate(secs)]
    at = lambda step, p1, p2: {("synthetic", step): {"p1": p1, "p2": p2}}
    records = {("grpo", 0): {"steps": steps([1.0] * 4), "greedy": {**at(0, 0, 0), **at(4, 1, 1)}},
               ("mel", 0): {"steps": steps([1.5] * 4), "greedy": {**at(0, 0, 0), **at(2, 0, 1), **at(4, 1, 1)}}}
    values, step = cmp._equal_time_readout(records, "mel", 0, "synthetic")
    assert step == pytest.approx(2 + (4 - 3) / (6 - 3) * 2)
    assert values == {"p1": pytest.approx(1 / 3), "p2": pytest.approx(1.0)}
    # an arm as fast as GRPO is read at its last evaluation; one past the budget at its first is read from the base
    records[("fast", 0)] = {**records[("grpo", 0)]}
    assert cmp._equal_time_readout(records, "fast", 0, "synthetic") == ({"p1": 1, "p2": 1}, 4.0)
    records[("slow", 0)] = {"steps": steps([8.0] * 4), "greedy": {**at(0, 0, 0), **at(4, 1, 1)}}
    values, step = cmp._equal_time_readout(records, "slow", 0, "synthetic")
    assert step == pytest.approx(4 * 4 / 32) and values["p1"] == pytest.approx(0.125)


def test_a_p_value_no_resample_reaches_is_a_bound_not_zero():
    assert cmp.p_text(0.0, 10_000) == "< 2e-04" and cmp.p_text(0.041, 10_000) == "0.041"
    assert cmp.p_text(0.0004, 10_000) == "4.0e-04"


def test_holm_adjusts_in_step_down_order():
    assert cmp.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert cmp.holm([0.5]) == [0.5]
    assert cmp.holm([0.9, 0.9]) == [1.0, 1.0]


@pytest.mark.slow
def test_compare_end_to_end(prefect_harness, tmp_path, capsys, micro_model):
    from mel_app.cli import main

    out = tmp_path / "report.md"
    argv = ["compare", "--config", "configs/tiny.yaml", "--name", "t", "--seeds", "1", "--out", str(out),
            "run.steps=1", f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}",
            "sampling.prompts_per_step=8", "sampling.group_size=4", "eval.max_problems=8", "eval.k=2"]
    with scripted_runtimes():  # both arms see mixed groups; the MEL arm has meta-experience to learn
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert cmp.command_line(argv) in printed.splitlines()[0]  # the exact command line, first
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.read_text() in printed

    for key in ("command", "arms", "seeds", "identical_problems", "runs", "curves", "heldout", "endpoints",
                "wall_time"):
        assert key in report, key
    assert report["arms"] == ["grpo", "mel"]
    assert report["seeds"] == [0] and report["identical_problems"] is True
    # one arm x one dataset x two read-outs, fixed in advance
    assert [(e["arm"], e["dataset"], e["readout"]) for e in report["endpoints"]] == [
        ("mel", "synthetic", "equal_steps"), ("mel", "synthetic", "equal_time")]
    for e in report["endpoints"]:
        assert e["bootstrap"]["n_problems"] == 8
        assert e["difference"] == pytest.approx(e["arm_pass_at_1"] - e["grpo_pass_at_1"])
        assert e["ci_low"] <= e["difference"] <= e["ci_high"]
        assert e["ci_low_simultaneous"] <= e["ci_low"] and e["ci_high"] <= e["ci_high_simultaneous"]
        assert e["p"] <= e["p_holm"] <= 1
    assert report["endpoints"][0]["steps"] == [1]
    assert all(e["primary"] for e in report["endpoints"])  # one held-out dataset: every endpoint is primary
    # the filter's view: every analysis that reached the replay is judged right or wrong by the world
    f = report["filter"]["mel"]
    reached = Store(report["runs"][1]["db"]).query(
        "SELECT count(*) AS n FROM analyses WHERE status = 'accepted' OR reject_reason = 'replay_failed'")[0]["n"]
    assert f["right_lessons"]["n"] + f["wrong_lessons"]["n"] == reached > 0
    assert [c["step"] for c in report["curves"]["grpo"]] == [1]
    g1, m1 = report["curves"]["grpo"][0], report["curves"]["mel"][0]
    assert g1["mixed_groups"] is not None and (g1["reward_mean"], g1["mixed_groups"]) == (m1["reward_mean"], m1["mixed_groups"])
    assert [h["step"] for h in report["heldout"]["synthetic"]["mel"]] == [0, 1]
    assert report["wall_time"]["grpo"]["seconds_per_step"] > 0 and report["wall_time"]["over_grpo"]["mel"] > 0
    assert "Differences to GRPO" in printed and "95% CI" in printed
    assert {"reward", "heldout-synthetic", "acceptance"} <= set(report["plots"])
    for name in report["plots"].values():
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in out.read_text()
    assert "## NLL per part of M" in out.read_text()  # the MEL arm trained on M: its loss per part is reported
    # a subset's name ("synthetic:skip") makes no ':' in a file name or link; eval.k = 0 says there is no Avg@k
    subset = dict(report, eval={**report["eval"], "k": 0}, heldout={"synthetic:skip": report["heldout"]["synthetic"]})
    (tmp_path / "plots").mkdir()
    plots = cmp.write_plots(subset, tmp_path / "plots", "x")
    assert plots["heldout-synthetic:skip"] == "x-heldout-synthetic-skip.png" and ":" not in "".join(plots.values())
    text = cmp.format_markdown({**subset, "plots": plots})
    assert "no sampled metrics, eval.k = 0" in text and "Avg@0" not in text

    runs = {r["arm"]: r for r in report["runs"]}
    grpo, mel = Store(runs["grpo"]["db"]), Store(runs["mel"]["db"])
    assert runs["grpo"]["db"] != runs["mel"]["db"]
    problems = "SELECT step, position, problem_id FROM prompts ORDER BY step, position"
    assert grpo.query(problems) == mel.query(problems) and len(grpo.query(problems)) == 8
    # same starting policy, same seed: the first step's rollouts are the same samples in both arms
    rollouts = "SELECT p.position, r.sample_index, r.text FROM rollouts r JOIN prompts p USING (prompt_id) ORDER BY 1, 2"
    assert grpo.query(rollouts) == mel.query(rollouts)
    stages = "SELECT DISTINCT stage FROM stage_runs ORDER BY stage"
    assert {r["stage"] for r in grpo.query(stages)} == {"warm_start", "sample", "verify", "update"}
    assert {"pair", "diagnose", "replay"} <= {r["stage"] for r in mel.query(stages)}
    assert grpo.query("SELECT nll_loss FROM updates")[0]["nll_loss"] in (0.0, None)
