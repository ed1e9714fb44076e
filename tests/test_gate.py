"""The gate (mel gate) on constructed situations: a scripted engine decides what the "model" writes, so every
rate and difference the gate reports is known in advance; a rules-world micro model is really scored and
really trained for the decisions and kappa."""

import hashlib
import random
import re

import pytest
import torch

from mel_core import config as C
from mel_core.problems.worlds import named_rules, rules
from mel_core.step.runtime import Runtime
from mel_core.study import gate
from mel_core.study.metrics import newcombe_difference
from tests.conftest import build_micro_model
from tests.scripted import Script, ScriptedEngine


def _bit(question: str) -> int:
    return hashlib.sha256(question.encode()).digest()[0] % 2


class RulesScript(Script):
    """A rules-world "model": greedy (sample 0) breaks the weak rules, odd samples follow them (mixed groups);
    its own analysis names the true rule on questions whose hash bit is 0 and another rule on the rest; with
    a meta-experience in context it solves exactly when the context states the problem's rule."""

    def write(self, prompt: str, index: int) -> str:
        self.seen.append(prompt)
        question = re.search(r"^Q: (.*)$", prompt, re.MULTILINE).group(1).strip()
        subset = rules.subset_of(question)
        right = "\n".join(rules.solution_lines(question))
        wrong = "\n".join(rules.inject_error(question, subset, random.Random(0))[0]) if subset != "plain" else right
        if prompt.rstrip().endswith("Analysis:"):
            incorrect = prompt.split("Wrong:\n", 1)[1].split("\nRight:", 1)[0] if "Wrong:\n" in prompt else wrong
            analysis = rules.oracle_analysis(question, incorrect.splitlines())
            return analysis if _bit(question) == 0 else analysis.replace(
                rules.ERROR_TYPES[subset], rules.ERROR_TYPES["double"])
        if prompt.startswith("Hint:"):
            return right if rules.ERROR_TYPES.get(subset, "-") in prompt else wrong
        return right if index % 2 == 1 else wrong


@pytest.fixture(scope="module")
def rules_model(tmp_path_factory):
    """A micro Qwen2 with the rules world's word-level tokenizer (untrained: what it computes is real, what it
    prefers is not the point)."""
    return build_micro_model(tmp_path_factory.mktemp("rules-micro"), config="configs/tiny-rules.yaml")


def _runtime(tmp_path, model, script):
    cfg = C.load("configs/tiny-rules.yaml", [f"run.root_dir={tmp_path}", f"model.name_or_path={model}",
                                             "sampling.prompts_per_step=8", "sampling.group_size=4",
                                             "data.synthetic.eval_size=40", "data.synthetic.train_size=64"])
    rt = Runtime(cfg)
    ckpt = rt.base_checkpoint
    rt.ensure_version(ckpt)
    rt.use_engine(ScriptedEngine(rt.policy.tokenizer, script))
    rt.ensure_version(ckpt)
    return rt, ckpt


def test_gate_reports_the_constructed_rates(tmp_path, rules_model):
    script = RulesScript()
    rt, ckpt = _runtime(tmp_path, rules_model, script)
    before = {k: v.clone() for k, v in rt.policy.model.state_dict().items()}
    r = gate.run_gate(rt, ckpt, gate.GateSettings(max_problems=6, kappa_steps=2, resamples=500))

    problems = gate.heldout(rt, gate.world_of(rt), gate.GateSettings(max_problems=6))
    weak = [p for p in problems if p.meta["subset"] in ("skip", "jump", "stay")]
    assert r["heldout_problems"] == 24 and len(weak) == 18
    # greedy is sample 0: it breaks every weak rule and solves every plain problem
    assert r["solve"]["no_weak_rule"]["rate"] == 1.0 and r["solve"]["no_weak_rule"]["n"] == 6
    assert all(r["solve"]["by_subset"][s]["rate"] == 0.0 for s in ("skip", "jump", "stay"))
    # the right meta-experience states the rule: solved; a mismatched one does not: not solved
    h = r["hints"]
    assert (h["problems"], h["none"]["rate"], h["right"]["rate"], h["mismatched"]["rate"]) == (18, 0.0, 1.0, 0.0)
    assert h["gain"]["mean"] == pytest.approx(1.0) and h["selectivity"]["mean"] == pytest.approx(1.0)
    # every weak problem's group is mixed (odd samples right): one pair each; the analysis names the true rule
    # exactly on the questions whose hash bit is 0
    d = r["discovery"]
    assert d["pairs"] == d["classified"] == 18 and d["parsed"]["rate"] == 1.0
    assert d["D"]["successes"] == sum(_bit(p.question) == 0 for p in weak)
    assert d["D"]["ci_low"] <= d["D"]["rate"] <= d["D"]["ci_high"]
    named_other = sum(n.get("double", 0) for n in d["named"].values())
    assert named_other == 18 - d["D"]["successes"]
    # decisions: one per weak problem, at the step where its rule applies, scored by the real micro model
    assert r["decisions"]["accuracy"]["n"] == 18
    # kappa: each step's lessons are its mixed groups' pairs (weak problems only: plain ones are never wrong)
    c = r["coupling"]
    steps = [rt.step_problems(s) for s in (1, 2)]
    assert c["lessons_per_step"] == [sum(p.meta["subset"] != "plain" for p in ps) for ps in steps]
    assert c["rollouts_per_step"] == 8 * 4 and c["nll"]["right"]["sequences"] == sum(c["lessons_per_step"])
    assert c["kappa"]["n"] == 18 and c["kappa"]["ci_low"] <= c["kappa"]["mean"] <= c["kappa"]["ci_high"]
    assert set(c["decision_accuracy"]) == {"before", "rl_only", "right", "mismatched"}
    # the arms trained for real (the right-lesson arm moved the decisions), and the policy is back at the checkpoint
    assert c["mean_right_logp"]["right"] != c["mean_right_logp"]["before"]
    after = rt.policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert r["verdict"]["open"] == (r["verdict"]["D_above_zero"] and r["verdict"]["kappa_above_zero"])
    text = gate.format_gate(r)
    assert "**D**" in text and "**kappa**" in text and "Verdict" in text


def test_the_gate_refuses_a_world_without_decisions(tmp_path, micro_model):
    rt = Runtime(C.load("configs/tiny.yaml", [f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}"]))
    with pytest.raises(C.ConfigError, match="data.synthetic.world.*decision"):
        gate.world_of(rt)
    assert not (tmp_path / rt.cfg.run.name / "mel.duckdb").exists()  # measuring creates no store


def test_named_rules_wilson_and_newcombe():
    world = rules.WORLD
    assert named_rules(world, ["If inc meets an odd digit, then jump.", "if INC meets an odd digit, then jump",
                                    "If in doubt, then stop."]) == ["jump", "jump"]
    w = gate.wilson(0, 20)
    assert w["rate"] == 0.0 and w["ci_low"] == 0.0 and w["ci_high"] == pytest.approx(0.161, abs=1e-3)
    w = gate.wilson(10, 20)
    assert w["ci_low"] == pytest.approx(0.299, abs=1e-3) and w["ci_high"] == pytest.approx(0.701, abs=1e-3)
    assert gate.wilson(0, 0)["rate"] is None
    # Newcombe (1998), Stat Med 17:873, method 10 on 56/70 vs 48/80: 0.0524 to 0.3339
    d = newcombe_difference(gate.wilson(56, 70), gate.wilson(48, 80))
    assert d["difference"] == pytest.approx(0.2) and (round(d["ci_low"], 4), round(d["ci_high"], 4)) == (0.0524, 0.3339)


def test_decision_points_name_the_rule_each_step_applies():
    q = "five: inc dec dec neg"
    points = rules.decision_points(q)
    assert [d.right for d in points] == ["jump", "down", "skip", "mirror"]
    lines = rules.solution_lines(q)
    for d, line in zip(points, lines):
        assert (d.prefix + d.continuations[d.choices.index(d.right)]) in "\n".join(lines)
        assert line.startswith(d.prefix.split("\n")[-1])
