"""The per-part gradient probe (mel gate --probe) and the warm start whose lessons are new (issue 22): a part's
gradient is the gradient of exactly its tokens, the strong_only stream never states a weak rule's lesson, and the
probe runs end to end on a real micro model (scripted sampling, real gradients and optimizer steps)."""

import random

import pytest
import torch

from mel_core import config as C
from mel_core.algorithm import losses
from mel_core.model import tiny
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import rules
from mel_core.study import gate, probe
from tests.conftest import build_micro_model
from tests.test_gate import RulesScript, _runtime

WEAK_LESSONS = [rules.ERROR_TYPES[r] for r in ("skip", "jump", "stay")]


@pytest.fixture(scope="module")
def rules_model(tmp_path_factory):
    """A micro Qwen2 with the rules world's word-level tokenizer (untrained)."""
    return build_micro_model(tmp_path_factory.mktemp("rules-micro"), config="configs/tiny-rules.yaml")


def _lessons(rt, n: int = 6) -> list[probe.Lesson]:
    """Oracle lessons of injected weak-rule errors on held-out problems, as the probe builds them from rollouts."""
    world = gate.world_of(rt)
    out = []
    for p in world.problems(rt.cfg.data.synthetic, "eval"):
        if p.meta["subset"] in ("skip", "jump", "stay") and len(out) < n:
            wrong, _ = rules.inject_error(p.question, p.meta["subset"], random.Random(0))
            out.append(probe.lesson_of(rt, world, p, "\n".join(wrong), "\n".join(rules.solution_lines(p.question))))
    assert all(x is not None for x in out) and len(out) == n
    return out


def test_the_wrong_line_mask_holds_exactly_the_quote_of_the_incorrect_line(tmp_path, rules_model):
    rt, _ = _runtime(tmp_path, rules_model, RulesScript())
    tok = rt.policy.tokenizer
    for lesson in _lessons(rt):
        text = tok.decode(lesson.target_ids[:-1])
        critique = next(line for line in text.splitlines() if line.startswith("Critique: "))
        wrong_line = critique.removeprefix("Critique: ").split(" should be ")[0]
        by_part = {name: tok.decode([i for i, lab in zip(lesson.target_ids, lesson.labels)
                                     if lab == probe.PROBE_PARTS.index(name)])
                   for name in probe.PROBE_PARTS}
        assert by_part["critique_wrong"] == f" {wrong_line}"
        assert by_part["heuristics"].strip().startswith("Heuristic:") and lesson.rule in ("skip", "jump", "stay")
        assert rules.ERROR_TYPES[lesson.rule] in by_part["heuristics"]
        assert by_part["bifurcation"].startswith("Bifurcation: step")
        assert " should be " in by_part["critique_rest"] and wrong_line not in by_part["critique_rest"].split(
            " should be ")[0]


def test_part_gradients_are_their_tokens_and_sum_to_the_whole(tmp_path, rules_model):
    rt, _ = _runtime(tmp_path, rules_model, RulesScript())
    lessons = _lessons(rt)
    parts = {name: probe.gradient(rt, lambda m=mask: probe.part_nll(*probe._lesson_logps(rt, lessons), m))
             for name, mask in probe.MASKS.items() if name != "all of M"}
    whole = probe.gradient(rt, lambda: losses.nll_loss(*probe._lesson_logps(rt, lessons)[:2])[0])
    # float32 rounding puts the sum within ~1e-6 relative of the whole; a token missing or counted twice would
    # move it by its share of the loss, one of ~30 tokens (>= 1%)
    assert (sum(parts.values()) - whole).norm() <= 1e-4 * whole.norm()
    assert all(g.norm() > 0 for g in parts.values())

    # each part's gradient is that of its tokens alone, computed another way: one unpadded sequence at a time,
    # cross-entropy on the part's positions only, weighted as MEL's NLL weighs them (1 / all target tokens / M)
    model, tok = rt.policy.model, rt.policy.tokenizer
    for name in ("critique_wrong", "heuristics"):
        def loss(name=name):
            total = 0.0
            for x in lessons:
                prompt = rt.policy.encode_prompts([x.prompt])[0]
                ids = torch.tensor([prompt + x.target_ids])
                labels = torch.tensor([[-100] * len(prompt) + [i if lab == probe.PROBE_PARTS.index(name) else -100
                                                               for i, lab in zip(x.target_ids, x.labels)]])
                logits = model(input_ids=ids).logits[0, :-1]
                total = total + torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100,
                                                                  reduction="sum") / len(x.target_ids)
            return total / len(lessons)
        mask = next(k for k, v in probe.MASKS.items() if v == (name,))
        other_way = probe.gradient(rt, loss)
        assert (parts[mask] - other_way).norm() <= 1e-4 * other_way.norm()
    del tok


def test_the_probe_reports_and_leaves_the_checkpoint_as_it_was(tmp_path, rules_model):
    rt, ckpt = _runtime(tmp_path, rules_model, RulesScript())
    before = {k: v.clone() for k, v in rt.policy.model.state_dict().items()}
    r = probe.run_probe(rt, ckpt, probe.ProbeSettings(batches=2, steps=2, max_problems=4, resamples=200))
    assert r["decisions"] == 12 and len(r["lessons_per_batch"]) == 2 and all(n > 0 for n in r["lessons_per_batch"])
    assert r["preconditioner"].startswith("none in the checkpoint")  # a saved model has no optimizer state
    g = r["geometry"]
    assert set(g) == set(probe.MASKS) | {"RL batch", "MEL step (RL + lambda NLL)"}
    for row in g.values():
        assert row["norm"]["n"] == 2 and -1 <= row["cos_raw"]["mean"] <= 1 and -1 <= row["cos_adam"]["mean"] <= 1
    assert set(r["confirmation"]) == set(probe.STEP_MASKS) | {"RL batch"}
    for c in r["confirmation"].values():
        assert len(c["delta_by_seed"]) == 2 and c["delta"]["n"] == 12
        assert c["delta"]["mean"] == pytest.approx(sum(c["delta_by_seed"]) / 2, abs=1e-9)
    assert r["confirmation"]["H"]["delta"]["mean"] != 0  # the steps trained for real
    nll = r["nll_per_part"]["weak"]
    assert nll["heuristics"]["tokens"] > 0 and nll["critique"]["tokens"] == (
        nll["critique_wrong"]["tokens"] + nll["critique_rest"]["tokens"])
    after = rt.policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "Gradient probe" in probe.format_probe(r)


def _analysis_targets(analysis_lessons: str, n: int = 400) -> list[str]:
    cfg = C.load("configs/tiny-rules.yaml", [f"warm_start.analysis_lessons={analysis_lessons}"])
    stream = tiny.example_stream(PromptSet.load(cfg.prompts.dir), cfg.data.synthetic, 0.5, 0.2, random.Random(0),
                                 analysis_lessons=analysis_lessons)
    examples = [next(stream) for _ in range(n)]
    assert not any(w in ex.target for ex in examples if ex.kind != "analysis" for w in WEAK_LESSONS)
    return [ex.target for ex in examples if ex.kind == "analysis"]


def test_the_strong_only_warm_start_never_states_a_weak_rule_lesson():
    strong = _analysis_targets("strong_only")
    everything = _analysis_targets("all")
    assert len(strong) > 100
    assert not any(lesson in t for t in strong for lesson in WEAK_LESSONS)
    stated = {line.removeprefix("Heuristic: ") for t in strong for line in t.splitlines() if line.startswith("Heuristic")}
    assert stated == {rules.ERROR_TYPES[r] for r in ("up", "down", "double", "mirror")}
    assert any(lesson in t for t in everything for lesson in WEAK_LESSONS)  # the default does state them


def test_the_two_warm_starts_never_share_a_cache_entry_and_strong_only_needs_weak_rules():
    a = C.load("configs/tiny-rules.yaml", [])
    b = C.load("configs/tiny-rules-newlessons.yaml", [])
    assert b.warm_start.analysis_lessons == "strong_only" and tiny.warm_start_key(a) != tiny.warm_start_key(b)
    with pytest.raises(C.ConfigError, match="warm_start.analysis_lessons"):
        C.load("configs/tiny.yaml", ["warm_start.analysis_lessons=strong_only"])
