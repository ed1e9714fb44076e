"""Reward plug-ins (verify.reward: module:function): called in the spawned verification workers with the per-item
deadline, given the problem's data row, judged (a value that is not a reward is recorded as rejected with its reason,
not a crash), recorded in the verifier identity, and re-scored by `mel rescore`; a campaign whose rewards are all 0
says once that MEL has nothing to analyse.

The plug-in module is a file this test writes into a folder that is not on the Python path: the parent finds it under
the working directory, the workers import it from the folder the parent found it in.
"""

import hashlib
import json
import os
import textwrap

import pytest

from mel_app import cli
from mel_core import config as C
from mel_core.algorithm.rewards import plugins
from mel_core.algorithm.rewards.pool import shared_pool
from mel_core.algorithm.rewards.verifier import Verifier
from mel_core.problems.problem import Problem
from mel_core.study.summary import NO_SIGNAL_STEPS, no_signal_warning
from tests.scripted import Script, run_step, scripted_runtime, scripted_runtimes

TINY = str(C.REPO_ROOT / "configs" / "tiny.yaml")  # (the tests run in the plug-in's folder)
MODULE = "mel_test_plugin_rewards"  # unique: the parent keeps it imported (sys.modules) after the test
PLUGIN = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    CALLS = Path(__file__).with_name("calls.txt")


    def exact(completion, problem):
        """Exact match of the completion's last line with a nested JSON field of the data row."""
        with CALLS.open("a") as f:
            f.write(f"{os.getpid()}\\n")
        return completion.strip().splitlines()[-1] == problem["row"]["meta"]["expected"]


    def loose(completion, problem):
        """Half credit when the expected answer is anywhere in the text."""
        expected = problem["row"]["meta"]["expected"]
        return 1.0 if completion.strip().splitlines()[-1] == expected else 0.5 if expected in completion else 0


    def by_mode(completion, problem):
        mode = problem["row"]["mode"]
        if mode == "sleep":
            time.sleep(30)
        if mode == "raise":
            raise ValueError("no")
        return {"true": True, "false": False, "half": 0.5, "two": 2.0, "nan": float("nan"), "word": "yes",
                "none": None}[mode]


    def zero(completion, problem):
        return 0


    def knows_the_question(completion, problem):
        """Right only when mel gave the plug-in the problem (its question), as a data-aware reward needs."""
        return bool(problem["question"])
''')


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(PLUGIN)
    monkeypatch.chdir(folder)  # found under the working directory, as `mel` run there would find it
    return folder


def _problem(mode: str) -> Problem:
    return Problem(f"p:{mode}", "q", "1", "p", row={"mode": mode})


def test_plugin_values_are_judged_in_the_workers_and_bad_ones_rejected_not_crashed(plugin_dir):
    verifier = Verifier("plugin", timeout_s=3.0, plugin=plugins.resolve(f"{MODULE}:by_mode"))
    modes = ["true", "false", "half", "two", "nan", "word", "none", "raise", "sleep"]
    verdicts = verifier.verify(["text"] * len(modes), ["1"] * len(modes), problems=[_problem(m) for m in modes])
    got = {m: (v.reward, v.reason) for m, v in zip(modes, verdicts)}
    assert got["true"] == (1.0, "correct") and got["false"] == (0.0, "wrong_answer")
    assert got["half"] == (0.5, "partial")
    assert got["two"] == (0.0, "rejected: returned 2.0, outside [0, 1]")
    assert got["nan"] == (0.0, "rejected: returned nan, outside [0, 1]")
    assert got["word"] == (0.0, "rejected: returned a str, not a number in [0, 1] or a bool")
    assert got["none"] == (0.0, "rejected: returned a NoneType, not a number in [0, 1] or a bool")
    assert got["raise"] == (0.0, "error: ValueError")
    assert got["sleep"] == (0.0, "timeout")  # the per-item deadline: the worker was killed at 3 s
    assert shared_pool().stats["killed_timeout"] >= 1
    # a length-cut completion is not given to the plug-in (verify.truncated_reward: zero), as with math-verify
    cut = verifier.verify(["text"], ["1"], ["length"], problems=[_problem("two")])
    assert (cut[0].reward, cut[0].reason) == (0.0, "truncated")


def test_identity_names_the_plugin_and_its_source_and_builtins_keep_their_hash(plugin_dir):
    v = Verifier.from_config(C.load(TINY, [f"verify.reward={MODULE}:exact"]).verify, "synthetic")
    source = (plugin_dir / f"{MODULE}.py").read_bytes()
    assert v.kind == "plugin" and v.identity["reward"] == f"{MODULE}:exact"
    assert v.identity["source_sha256"] == hashlib.sha256(source).hexdigest()
    assert v.identity["extraction"] is None and v.identity["timeout_s"] == 5.0
    # an edited plug-in is another verifier
    (plugin_dir / f"{MODULE}.py").write_bytes(source + b"\n# edited\n")
    assert plugins.resolve(f"{MODULE}:exact").source_sha256 != v.plugin.source_sha256
    # the built-ins are the two registered rewards auto picks, with the identity (and hash) they always had
    synthetic = Verifier.from_config(C.load(TINY).verify, "synthetic")
    assert synthetic.identity_hash == "a59cbf393e1fd9b5"  # as before verify.reward existed
    assert Verifier.from_config(C.load(TINY, ["verify.reward=math"]).verify, "synthetic").kind == "math"
    assert set(Verifier.from_config(C.load(TINY).verify, "math").identity) == {
        "version", "kind", "extraction", "truncated_reward", "timeout_s", "packages"}


@pytest.mark.parametrize("reward, said", [
    ("no_such_module_here:f", "verify.reward: no module 'no_such_module_here'"),
    (f"{MODULE}:missing", f"verify.reward: module '{MODULE}' has no function 'missing'"),
    (f"{MODULE}:CALLS", f"verify.reward: module '{MODULE}' has no function 'CALLS'"),
    ("a b:c", "is not auto, math, synthetic or module:function"),
])
def test_a_plugin_that_is_not_one_is_one_config_error(plugin_dir, reward, said):
    cfg = C.load(TINY, [f"verify.reward={reward}"])
    with pytest.raises(C.ConfigError) as e:
        Verifier.from_config(cfg.verify, "math")
    assert said in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(C.ConfigError, match="verify.reward"):
        C.load(TINY, ["verify.reward=nonsense"])


QUESTIONS = {"What is 40+2?": "42", "What is 3+4?": "7"}
TEXTS = {"What is 40+2?": ["Working.\n42", "I think 41"], "What is 3+4?": ["It is 7 or 8\n8", "7"]}


@pytest.mark.slow
def test_a_plugin_trains_a_run_and_mel_rescore_scores_it_again(plugin_dir, tmp_path, micro_model, capsys):
    data = tmp_path / "nested.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": a, "meta": {"expected": a}}) + "\n"
                            for q, a in QUESTIONS.items()))
    cfg = C.load(TINY, [
        "run.name=plugin", f"run.root_dir={tmp_path / 'runs'}", f"model.name_or_path={micro_model}",
        f"data.source={data}", "sampling.prompts_per_step=2", "sampling.group_size=2",
        f"verify.reward={MODULE}:exact", "experience.enabled=false"])
    rt, base = scripted_runtime(cfg, Script(rollout=lambda q, i: TEXTS[q][i]))
    run_step(rt, 1, base, experience_stages=False)
    rt.store.publish()
    rows = rt.store.query("SELECT p.question, r.sample_index, r.reward, r.verify_reason, r.verifier_hash "
                          "FROM rollouts r JOIN prompts p USING (prompt_id) ORDER BY p.question, r.sample_index")
    assert [(r["question"], r["sample_index"], r["reward"], r["verify_reason"]) for r in rows] == [
        ("What is 3+4?", 0, 0.0, "wrong_answer"), ("What is 3+4?", 1, 1.0, "correct"),
        ("What is 40+2?", 0, 1.0, "correct"), ("What is 40+2?", 1, 0.0, "wrong_answer")]
    assert {r["verifier_hash"] for r in rows} == {rt.verifier.identity_hash}
    identity = json.loads(rt.store.query("SELECT identity_json FROM verifiers WHERE verifier_hash = ?",
                                         [rt.verifier.identity_hash])[0]["identity_json"])
    assert identity["kind"] == "plugin" and identity["reward"] == f"{MODULE}:exact"
    # it ran in the spawned workers, not in this process
    pids = {int(x) for x in (plugin_dir / "calls.txt").read_text().split()}
    assert pids and os.getpid() not in pids

    # mel rescore with another plug-in of the module: it is given the stored data row again
    assert cli.main(["rescore", str(rt.run_dir), f"verify.reward={MODULE}:loose"]) == 0
    capsys.readouterr()
    loose = Verifier.from_config(C.load(TINY, [f"verify.reward={MODULE}:loose"]).verify, "math")
    rescored = rt.store.query("SELECT p.question, r.sample_index, w.reward, w.verify_reason FROM rewards w "
                              "JOIN rollouts r ON r.rollout_id = w.record_id JOIN prompts p USING (prompt_id) "
                              "WHERE w.verifier_hash = ? ORDER BY p.question, r.sample_index", [loose.identity_hash])
    assert [(r["reward"], r["verify_reason"]) for r in rescored] == [
        (0.5, "partial"), (1.0, "correct"), (1.0, "correct"), (0.0, "wrong_answer")]
    stored = json.loads(rt.store.query("SELECT identity_json FROM verifiers WHERE verifier_hash = ?",
                                       [loose.identity_hash])[0]["identity_json"])
    assert stored == loose.identity and stored["reward"] == f"{MODULE}:loose"


def test_no_signal_warning_is_said_once_at_the_nth_step():
    zero = {"mixed_groups": 0, "reward_mean": 0.0}
    said = [no_signal_warning([zero] * n) for n in range(1, NO_SIGNAL_STEPS + 3)]
    assert said.count(None) == NO_SIGNAL_STEPS + 1
    assert said[NO_SIGNAL_STEPS - 1] == (
        f"mel: no mixed groups in {NO_SIGNAL_STEPS} steps: MEL has nothing to analyse (every rollout scored 0); "
        "check the reward (verify.reward, data.answer_field) or start from a policy that solves some of the problems")
    assert no_signal_warning([zero] * 4 + [{"mixed_groups": 1, "reward_mean": 0.5}]) is None
    assert "every rollout scored 1" in no_signal_warning([{"mixed_groups": 0, "reward_mean": 1.0}] * 5)


@pytest.mark.slow
def test_a_campaign_whose_rewards_are_all_zero_says_so_once(plugin_dir, tmp_path, micro_model, capsys,
                                                            prefect_harness):
    from flows.campaign import campaign

    cfg = C.load(TINY, [
        "run.name=zeros", f"run.root_dir={tmp_path / 'runs'}", f"model.name_or_path={micro_model}", "run.steps=2",
        "sampling.prompts_per_step=2", "sampling.group_size=2", f"verify.reward={MODULE}:zero", "eval.every_n_steps=0",
        "logging.report_at_end=false"])
    with scripted_runtimes():
        campaign(C.to_dict(cfg))
    out = capsys.readouterr().out
    assert out.count("mel: no mixed groups in 2 steps: MEL has nothing to analyse (every rollout scored 0)") == 1


def test_the_readme_example_plugins_score_in_the_workers():
    """examples/my_rewards.py, found from the repository root (the tests' working directory) as `mel` run there
    finds it: exact match of the Answer: line with a JSON field of the row, and a unit-test runner."""
    exact = Verifier("plugin", plugin=plugins.resolve("examples.my_rewards:answer_line"))
    rows = [{"expected": "no"}, {"expected": "no"}, {}]
    problems = [Problem(f"p:{i}", "q", "7", "p", row=r) for i, r in enumerate(rows)]
    got = exact.verify(["x\nAnswer: no", "Answer: yes", "Answer: 7"], ["7"] * 3, problems=problems)
    assert [v.reward for v in got] == [1.0, 0.0, 1.0]
    runner = Verifier("plugin", timeout_s=20, plugin=plugins.resolve("examples.my_rewards:unit_tests"))
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    row = {"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]}
    got = runner.verify([code, "no code"], ["", ""], problems=[Problem("u:1", "q", "-", "u", row=row)] * 2)
    assert [(v.reward, v.reason) for v in got] == [(0.5, "partial"), (0.0, "wrong_answer")]


def test_the_gate_gives_a_plugin_each_problem_as_training_and_evaluation_do(plugin_dir, tmp_path_factory,
                                                                           monkeypatch):
    from mel_core.problems.worlds import rules
    from mel_core.step.runtime import Runtime
    from mel_core.study import gate
    from tests.conftest import build_micro_model
    from tests.scripted import ScriptedEngine

    model = build_micro_model(tmp_path_factory.mktemp("rules-micro"), config="configs/tiny-rules.yaml")
    monkeypatch.chdir(plugin_dir)  # the plug-in is found under the working directory, which building the model left
    rt = Runtime(C.load(str(C.REPO_ROOT / "configs" / "tiny-rules.yaml"), [
        f"run.root_dir={plugin_dir}", f"model.name_or_path={model}", f"verify.reward={MODULE}:knows_the_question",
        "data.synthetic.eval_size=40", "data.synthetic.train_size=64"]))
    rt.ensure_version(rt.base_checkpoint)
    rt.use_engine(ScriptedEngine(rt.policy.tokenizer, Script(rollout=lambda q, i: "\n".join(rules.solution_lines(q)))))
    problems = gate.heldout(rt, gate.world_of(rt), gate.GateSettings(max_problems=2))
    accuracy = gate.solve_accuracy(rt, problems, tuple(rt.cfg.data.synthetic.rules.weak_rules))
    for rate in (accuracy["no_weak_rule"], *accuracy["by_subset"].values()):  # every problem reached the plug-in
        assert rate["n"] > 0 and rate["successes"] == rate["n"]
