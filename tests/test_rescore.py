"""Verifier provenance and `mel rescore`: a constructed math run scored with math-verify's own extraction, then
re-scored with boxed_last, where the two read different answers from the same texts.

The run (tests/scripted.py decides every text): two problems, two rollouts each, one replay per analysis, one
greedy evaluation sample per problem. What each text scores under each verifier (checked against math-verify
0.9.0 when the test was written) decides exactly which rewards flip and which accepted heuristic is lost.
"""

import json

import pytest

from mel_app import cli
from mel_core import config as C
from mel_core.algorithm.rewards.verifier import Verifier
from mel_core.run import lock
from mel_core.store.reader import StoreReader
from mel_core.store.writer import Store
from mel_core.study import evaluation
from tests.scripted import Script, run_step, scripted_runtime

pytestmark = pytest.mark.slow

A, B = "What is 40+2?", "What is 3+4?"
ROLLOUTS = {
    A: ["40+2 = 42, so the answer is 42.",  # no box: math_verify reads the last number (1), boxed_last none (0)
        "40+2 = 41. \\boxed{41}"],            # wrong under both
    B: ["\\boxed{7}",                         # right under both
        "First \\boxed{6}. Checking again, the sum is \\boxed{7}."],  # two boxes: a set {6,7} (0) vs the last (1)
}
REPLAYS = {A: "With the hint, the answer is 42.",  # accepted only because math_verify read the unboxed 42
           B: "With the hint: \\boxed{7}"}
RULES = {A: "If a sum is reported, then recompute it before stating it.",
         B: "If two results disagree, then check the last one again."}
# (record kind, question, sample index) -> (reward under math_verify, reward under boxed_last), for every flip
EXPECTED_FLIPS = {("rollout", A, 0): (1.0, 0.0), ("rollout", B, 1): (0.0, 1.0), ("replay", A, 0): (1.0, 0.0),
                  ("eval_sample", A, 0): (1.0, 0.0)}


def math_script() -> Script:
    return Script(rollout=lambda q, i: ROLLOUTS[q][i], replay=lambda q: REPLAYS[q],
                  analysis=lambda q: f"Bifurcation: step 1\nCritique: the sum was miscounted.\nHeuristic: {RULES[q]}")


@pytest.fixture()
def math_run(tmp_path, micro_model):
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in ((A, "42"), (B, "7"))))
    cfg = C.load("configs/tiny.yaml", [
        "run.name=rescore", f"run.root_dir={tmp_path / 'runs'}", f"model.name_or_path={micro_model}",
        f"data.source={data}", "sampling.prompts_per_step=2", "sampling.group_size=2", "verify.extraction=math_verify",
        "eval.k=0", f"eval.datasets=[{data}]"])
    rt, base = scripted_runtime(cfg, math_script())
    out = run_step(rt, 1, base)
    evaluation.evaluate(rt, out["checkpoint"], str(data))
    rt.store.publish()
    return rt


def _originals(store) -> dict:
    return {t: store.query(f"SELECT {key}, reward, verify_reason, verifier_hash FROM {t} ORDER BY {key}")
            for t, key in (("rollouts", "rollout_id"), ("replays", "replay_id"), ("eval_samples", "sample_id"))}


def _flips(store) -> dict:
    """reward_flips as {(kind, question, sample index): (old, new)}."""
    rows = store.query("SELECT f.record_kind, f.old_reward, f.new_reward, "
                       "coalesce(p.question, s.question) AS question, "
                       "coalesce(r.sample_index, rp.replay_index, s.sample_index) AS i FROM reward_flips f "
                       "LEFT JOIN rollouts r ON r.rollout_id = f.record_id "
                       "LEFT JOIN replays rp ON rp.replay_id = f.record_id "
                       "LEFT JOIN eval_samples s ON s.sample_id = f.record_id "
                       "LEFT JOIN prompts p ON p.prompt_id = coalesce(r.prompt_id, rp.prompt_id)")
    return {(r["record_kind"], r["question"], r["i"]): (r["old_reward"], r["new_reward"]) for r in rows}


def test_every_reward_row_names_the_verifier_that_produced_it(math_run):
    store = math_run.store
    mv = Verifier("math", extraction="math_verify")
    for table, rows in _originals(store).items():
        assert rows and {r["verifier_hash"] for r in rows} == {mv.identity_hash}, table
    row = store.query("SELECT * FROM verifiers WHERE verifier_hash = ?", [mv.identity_hash])[0]
    identity = json.loads(row["identity_json"])
    assert (row["kind"], row["extraction"]) == ("math", "math_verify") == (identity["kind"], identity["extraction"])
    assert identity["packages"]["math-verify"]  # the installed version that scored these rewards


def test_rescore_with_boxed_last_flips_exactly_the_constructed_records(math_run, capsys):
    store = math_run.store
    before = _originals(store)
    assert cli.main(["rescore", str(math_run.run_dir), "verify.extraction=boxed_last"]) == 0
    out = capsys.readouterr().out

    assert _originals(store) == before  # the original rewards and their verifier are untouched
    boxed = Verifier("math", extraction="boxed_last").identity_hash
    versions = store.query("SELECT verifier_hash, record_kind, count(*) AS n FROM rewards GROUP BY ALL ORDER BY ALL")
    assert [(v["verifier_hash"], v["record_kind"], v["n"]) for v in versions] == [
        (boxed, "eval_sample", 2), (boxed, "replay", 2), (boxed, "rollout", 4)]
    assert _flips(store) == EXPECTED_FLIPS

    lost = store.query("SELECT heuristic, lost, correct_before, correct_after FROM heuristic_acceptance_flips")
    assert [(h["heuristic"], h["lost"], h["correct_before"], h["correct_after"]) for h in lost] == \
        [(RULES[A], True, 1, 0)]
    accepted = store.query("SELECT text FROM heuristics WHERE accepted ORDER BY text")
    assert [h["text"] for h in accepted] == sorted(RULES.values())  # both were accepted under math_verify

    assert "flipped: 4 of 8 rewards (3 went from 1 to 0, 1 from 0 to 1)" in out
    assert "accepted heuristics that would not have been accepted under the new verifier: 1" in out
    assert RULES[A] in out and RULES[B] not in out
    with StoreReader(math_run.run_dir) as reader:  # published: readers see the new version and the views
        assert reader.query("SELECT count(*) AS n FROM reward_flips")[0]["n"] == 4


def test_rescoring_again_adds_nothing(math_run, capsys):
    assert cli.main(["rescore", str(math_run.run_dir), "verify.extraction=boxed_last"]) == 0
    counts = Store(math_run.store.path).counts()
    capsys.readouterr()
    assert cli.main(["rescore", str(math_run.run_dir), "verify.extraction=boxed_last"]) == 0
    assert Store(math_run.store.path).counts() == counts
    assert "(0 verified now, 8 already scored by this verifier)" in capsys.readouterr().out


def test_rescore_refuses_bad_input_in_one_line(math_run, capsys, tmp_path):
    run = str(math_run.run_dir)
    for argv, says in ((["rescore", run, "loss.nll_coef=0"], "verify.* overrides only"),
                       (["rescore", run, "verify.extraction=nope"], "verify.extraction"),
                       (["rescore", str(tmp_path / "nowhere")], "no run")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1
    with lock.run_lock(math_run.run_dir, log=lambda _: None):  # as a campaign holds it
        assert cli.main(["rescore", run, "verify.extraction=boxed_last"]) == 2
        assert "in use by a campaign" in capsys.readouterr().err
    assert math_run.store.query("SELECT count(*) AS n FROM rewards")[0]["n"] == 0


def test_a_world_subset_is_rescored_by_the_world_verifier_not_math_verify():
    """Evaluations of 'synthetic:<subset>' (the rules world's per-rule sets) are the world's answers: rescoring
    them with math-verify would turn every correct `Answer: nine` into no_answer."""
    from mel_core.study import rescore

    cfg = C.load("configs/tiny-rules.yaml")
    verifiers = {kind: Verifier.from_config(cfg.verify, kind) for kind in ("synthetic", "math")}
    text = "1 neg eight mirror one\n2 dec one down zero\nAnswer: zero"
    records = [{"record_id": f"e{i}", "record_kind": "eval_sample", "dataset": ds, "text": text, "answer": "zero",
                "finish_reason": "stop"} for i, ds in enumerate(("synthetic", "synthetic:plain", "synthetic:stay"))]
    assert [rescore.reward_kind(r, "synthetic") for r in records] == ["synthetic"] * 3
    assert rescore.reward_kind({"record_kind": "eval_sample", "dataset": "math500"}, "synthetic") == "math"
    rows = rescore.verdict_rows(records, verifiers, "synthetic", "run_x")
    assert [r["reward"] for r in rows] == [1.0, 1.0, 1.0]
    assert {r["verifier_hash"] for r in rows} == {verifiers["synthetic"].identity_hash}
