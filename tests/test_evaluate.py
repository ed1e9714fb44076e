"""Evaluation of a checkpoint: a micro model on the synthetic held-out split and on shipped math sets (it
scores ~0, but every sample and its verify reason is recorded, and the metrics are the samples')."""

import pytest

from mel_core import config as C
from mel_core.run import executions
from mel_core.step.runtime import Runtime, clear_runtimes
from mel_core.study import evaluation as ev


def _spy_prompts(rt: Runtime) -> list[str]:
    """Record every prompt the engine is asked to continue (the real engine still runs)."""
    seen: list[str] = []
    generate = rt.engine.generate

    def recording(prompts, params, desc=""):
        seen.extend(prompts)
        return generate(prompts, params, desc)

    rt.engine.generate = recording
    return seen


@pytest.fixture(scope="module")
def tiny_rt(tmp_path_factory, micro_model):
    cfg = C.load("configs/tiny.yaml", ["run.name=eval", f"run.root_dir={tmp_path_factory.mktemp('runs')}",
                                       f"model.name_or_path={micro_model}", "eval.max_problems=12", "eval.k=3"])
    rt = Runtime(cfg)
    base = rt.base_checkpoint
    executions.register_run(rt, base)
    rt.ensure_version(base)
    return rt, base


def test_synthetic_eval_of_a_checkpoint(tiny_rt):
    rt, base = tiny_rt
    prompts = _spy_prompts(rt)
    out = ev.evaluate(rt, base, "synthetic")
    assert out["dataset"] == "synthetic" and out["num_problems"] == 12 and out["step"] == 0
    assert set(out["metrics"]) == {"pass@1", "avg@3", "pass@3"}

    # the plain solve prompt only: one greedy call (12 prompts), one sampled call (12 prompts x 3 samples)
    held_out = ev.load_dataset(rt.cfg, "synthetic").problems
    assert [p.problem_id for p in held_out] == [f"synthetic:eval:{i}" for i in range(12)]
    assert prompts == 2 * [rt.model_input(rt.prompts.render_solve(p.question)) for p in held_out]
    assert not any("Heuristic" in p or "Hint" in p for p in prompts)

    samples = rt.store.query("SELECT * FROM eval_samples WHERE checkpoint_id = ?", [base.checkpoint_id])
    greedy = [s for s in samples if s["greedy"]]
    sampled = [s for s in samples if not s["greedy"]]
    assert len(greedy) == 12 and len(sampled) == 36
    assert {s["sample_index"] for s in sampled} == {0, 1, 2} and all(s["temperature"] == 0.6 for s in sampled)
    assert all(s["verify_reason"] for s in samples)
    assert out["metrics"]["pass@1"] == pytest.approx(sum(s["reward"] > 0 for s in greedy) / 12)
    assert out["metrics"]["avg@3"] == pytest.approx(sum(s["reward"] > 0 for s in sampled) / 36)
    assert out["metrics"]["pass@3"] >= out["metrics"]["avg@3"]
    by_problem = {}
    for s in sampled:
        by_problem.setdefault(s["problem_id"], []).append(s["reward"] > 0)
    assert out["metrics"]["pass@3"] == pytest.approx(sum(any(v) for v in by_problem.values()) / 12)

    rows = {r["metric"]: r for r in rt.store.query("SELECT * FROM evals WHERE checkpoint_id = ?", [base.checkpoint_id])}
    assert set(rows) == {"pass@1", "avg@3", "pass@3"}
    assert (rows["pass@1"]["k"], rows["pass@1"]["temperature"], rows["avg@3"]["k"]) == (1, 0.0, 3)
    assert all(r["num_problems"] == 12 and r["run_id"] == rt.run_id and r["seconds"] > 0 for r in rows.values())
    view = rt.store.query("SELECT * FROM heldout_accuracy WHERE checkpoint_id = ?", [base.checkpoint_id])
    assert len(view) == 1 and view[0]["pass_at_1"] == rows["pass@1"]["value"] and view[0]["k"] == 3

    # idempotent: evaluating again replaces the rows with identical ones
    again = ev.evaluate(rt, base, "synthetic")
    assert again["metrics"] == out["metrics"]
    assert rt.store.query("SELECT count(*) AS n FROM evals")[0]["n"] == 3
    assert rt.store.query("SELECT count(*) AS n FROM eval_samples")[0]["n"] == 48


def test_a_smaller_rerun_replaces_the_triple(tiny_rt, tmp_path):
    rt, base = tiny_rt
    cfg = C.load(overrides=["eval.max_problems=4", "eval.k=1"], base=C.to_dict(rt.cfg))
    small = Runtime(cfg)  # another run id (the eval config is part of the hash), the same DuckDB file
    out = ev.evaluate(small, base, "synthetic", run_id=rt.run_id)
    assert set(out["metrics"]) == {"pass@1", "avg@1"}  # with k = 1, 'pass@1' stays the greedy metric
    assert small.store.path == rt.store.path
    rows = rt.store.query("SELECT metric, num_problems FROM evals WHERE checkpoint_id = ? ORDER BY metric",
                          [base.checkpoint_id])
    assert rows == [{"metric": "avg@1", "num_problems": 4}, {"metric": "pass@1", "num_problems": 4}]
    assert rt.store.query("SELECT count(*) AS n FROM eval_samples")[0]["n"] == 8


def test_due_steps():
    cfg = C.load("configs/tiny.yaml", ["run.steps=7", "eval.every_n_steps=3"])
    assert [s for s in range(8) if ev.is_due(cfg, s)] == [0, 3, 6, 7]
    assert not any(ev.is_due(C.load("configs/tiny.yaml"), s) for s in range(8))
    with pytest.raises(C.ConfigError, match="eval.datasets"):
        C.load("configs/tiny.yaml", ["eval.every_n_steps=2", "eval.datasets=[]"])


def test_eval_config_hash_tracks_what_shapes_an_evaluation():
    cfg = C.load("configs/tiny.yaml")
    h = ev.eval_config_hash(cfg, "synthetic")
    assert ev.eval_config_hash(C.load("configs/tiny.yaml", ["eval.every_n_steps=5"]), "synthetic") == h
    for ov in ("eval.k=4", "eval.max_problems=10", "eval.temperature=1.0", "eval.max_new_tokens=32"):
        assert ev.eval_config_hash(C.load("configs/tiny.yaml", [ov]), "synthetic") != h, ov
    assert ev.eval_config_hash(cfg, "data/amc23/test.jsonl") != ev.eval_config_hash(cfg, "data/aime24/test.jsonl")


def test_math_sets_with_a_micro_model(micro_model, tmp_path):
    cfg = C.load("configs/tiny.yaml", [f"model.name_or_path={micro_model}", f"run.root_dir={tmp_path}",
                                       "run.name=micro", "eval.max_problems=3", "eval.k=2", "eval.max_new_tokens=4"])
    rt = Runtime(cfg)
    ckpt = rt.base_checkpoint
    outs = {d: ev.evaluate(rt, ckpt, d) for d in ("data/math500/test.jsonl", "data/gsm8k/test.jsonl")}
    assert [o["dataset"] for o in outs.values()] == ["math500", "gsm8k"]
    assert all(o["step"] is None for o in outs.values())  # a checkpoint this store has never registered
    rows = rt.store.query("SELECT dataset, problem_id, greedy, reward, verify_reason, num_tokens, question "
                          "FROM eval_samples ORDER BY dataset, problem_id, greedy")
    assert len(rows) == 2 * (3 + 3 * 2)
    assert {r["problem_id"] for r in rows} == {f"{d}:{i}" for d in ("math500", "gsm8k") for i in (1, 2, 3)}
    assert all(r["verify_reason"] and r["reward"] in (0.0, 1.0) and r["num_tokens"] <= 4 for r in rows)
    # gsm8k keeps its question under 'question' (math500: 'problem'); both were read
    assert all(r["question"].strip() for r in rows)
    evals = rt.store.query("SELECT dataset, metric, value FROM evals ORDER BY dataset, metric")
    assert [(e["dataset"], e["metric"]) for e in evals] == [
        ("gsm8k", "avg@2"), ("gsm8k", "pass@1"), ("gsm8k", "pass@2"),
        ("math500", "avg@2"), ("math500", "pass@1"), ("math500", "pass@2")]
    assert all(e["value"] <= 1 / 3 for e in evals)  # an untrained model: at most a fluke
    clear_runtimes()


def test_a_missing_dataset_file_is_a_clear_error(tiny_rt):
    rt, _ = tiny_rt
    with pytest.raises(FileNotFoundError, match="no/such.jsonl"):
        ev.load_dataset(rt.cfg, "data/no/such.jsonl")
