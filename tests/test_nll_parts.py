"""The NLL target options (issue 22): which tokens of M* carry loss (experience.nll_parts, mask_quoted_solution),
how L_NLL averages its targets (loss.nll_normalization), mel-distill's replay targets and the count-matched
grpo+sft. Each setting is checked to change exactly what it says, on constructed targets and steps."""

import re

import pytest
import torch

from mel_core import config as C
from mel_core.algorithm import losses, nll_targets
from mel_core.algorithm.meta_experience import PARTS
from mel_core.model.policy import NLLBatch, Policy, RLBatch
from mel_core.step import stages
from tests.scripted import Script, run_step, scripted_runtime, solution, typed_error

OTHER, BIF, CRIT, HEUR = (PARTS.index(p) for p in ("other", "bifurcation", "critique", "heuristics"))


# ------------------------------------------------------------------------------------- pure masks


def test_each_part_selection_keeps_exactly_its_parts():
    parts = [OTHER, BIF, BIF, CRIT, CRIT, CRIT, HEUR, HEUR, OTHER]  # title, s*, C, H, end token
    assert nll_targets.loss_mask(parts, PARTS, "all") == [1] * 9
    assert nll_targets.loss_mask(parts, PARTS, "heuristics") == [0, 0, 0, 0, 0, 0, 1, 1, 0]
    assert nll_targets.loss_mask(parts, PARTS, "critique+heuristics") == [0, 0, 0, 1, 1, 1, 1, 1, 0]
    # a quote flag takes the loss off a critique token only (a heuristic that happens to match keeps it)
    quoted = [False, True, False, True, False, True, False, True, False]
    assert nll_targets.loss_mask(parts, PARTS, "all", quoted) == [1, 1, 1, 0, 1, 0, 1, 1, 1]
    assert nll_targets.loss_mask(parts, PARTS, "critique+heuristics", quoted) == [0, 0, 0, 0, 1, 0, 1, 1, 0]


def test_quotes_are_verbatim_solution_lines_and_cover_whole_tokens():
    incorrect, correct = "14+9=23\n23*16=368\nAnswer: 368", "9*16=144\n14+144=158\nAnswer: 158"
    lines = nll_targets.quotable_lines([incorrect, correct])
    assert "23*16=368" in lines and "Answer: 158" in lines and len(lines) == 6  # every line is >= 6 characters
    assert nll_targets.quotable_lines(["x=3\nSo\n  9*16=144  "]) == ["9*16=144"]  # short lines are not looked for
    text = "Critique: 14+9=23 should be 9*16=144."
    spans = nll_targets.quoted_spans(text, lines)
    assert [text[s:e] for s, e in spans] == ["14+9=23", "9*16=144"]
    # tokens as a byte-level tokenizer cuts them: the blank before a word is its token's, not the quote's
    offsets = [(0, 9), (9, 13), (13, 14), (14, 15), (15, 17), (17, 24), (24, 27), (27, 31), (31, 36), (36, 37)]
    assert "".join(text[s:e] for s, e in offsets) == text
    assert nll_targets.tokens_within(text, offsets, spans) == [False, True, True, True, True, False, False, True,
                                                               True, False]


# --------------------------------------------------------------------------- the update's arithmetic


def _policy(micro_model, *more) -> Policy:
    cfg = C.load("configs/tiny.yaml", [f"model.name_or_path={micro_model}", "sampling.prompts_per_step=2",
                                       "sampling.group_size=2", "optim.micro_batch_size=0", *more])
    policy = Policy(cfg, micro_model)
    # The fresh micro model is near uniform (every token ~log V nats): spread its weights, the same way in every
    # policy made here, so tokens differ in NLL and leaving some out of the loss shows.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return policy


def _batches(policy: Policy) -> tuple[RLBatch, NLLBatch]:
    tok = policy.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    rl = RLBatch(prompts=["Q: 1+2\nA:\n"] * 2 + ["Q: 3*3\nA:\n"] * 2,
                 completion_ids=[ids("1+2=3\nAnswer: 3"), ids("1+2=4\nAnswer: 4"), ids("3*3=9"), ids("3*3=6")],
                 advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]))
    targets = [ids("Bifurcation: step 1\nCritique: 1+2=4 is wrong\nHeuristic: If adding, then add"),
               ids("Bifurcation: step 2\nHeuristic: If in doubt, then check"), ids("Critique: 3*3=6\nHeuristic: Then")]
    parts = [[BIF] * 4 + [CRIT] * (len(targets[0]) - 9) + [HEUR] * 5, [BIF] * 3 + [HEUR] * (len(targets[1]) - 3),
             [CRIT] * 4 + [HEUR] * (len(targets[2]) - 4)]
    assert all(len(p) == len(t) for p, t in zip(parts, targets))
    trained = [[int(p == HEUR) for p in row] for row in parts]
    nll = NLLBatch(prompts=["Wrong:\n1+2=4\nAnalysis:\n", "Wrong:\n7\nAnalysis:\n", "Analysis:\n"], target_ids=targets,
                   parts=parts, part_names=PARTS, trained=trained)
    return rl, nll


def _hand_nll(policy: Policy, nll: NLLBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-log p of each target token under the policy as it is, the target mask and the trained mask, [M, T]."""
    ids, attn, mask, labels = policy.encode(nll.prompts, nll.target_ids, nll.parts)
    trained = torch.zeros_like(mask)
    for i, row in enumerate(nll.trained):
        trained[i, :len(row)] = torch.tensor(row, dtype=mask.dtype)
    with torch.no_grad():
        logps = losses.per_token_logps(policy.model, ids, attn, mask.size(1), 1.0)
    return -logps.double() * mask, mask.double(), trained.double(), labels


def test_the_nll_is_the_mean_over_trained_tokens_and_parts_are_logged_over_all(micro_model):
    policy = _policy(micro_model, "experience.nll_parts=heuristics")
    rl, nll = _batches(policy)
    nlp, mask, trained, labels = _hand_nll(policy, nll)
    per_target = (nlp * trained).sum(1) / trained.sum(1)
    everything = ((nlp * mask).sum(1) / mask.sum(1)).mean().item()
    stats = policy.train_step(rl, nll)
    assert stats["nll_loss"] == pytest.approx(per_target.mean().item(), rel=1e-5)
    assert abs(stats["nll_loss"] - everything) > 1e-3  # the untrained tokens would have moved it
    assert stats["num_nll_trained_tokens"] == int(trained.sum())
    bif = (labels == BIF).double() * mask
    assert stats["nll_bifurcation"] == pytest.approx(((nlp * bif).sum() / bif.sum()).item(), rel=1e-5)  # untrained, logged


def test_batch_normalization_is_accepted_times_targets_over_prompts(micro_model):
    accepted = _policy(micro_model, "experience.nll_parts=heuristics")
    batch = _policy(micro_model, "experience.nll_parts=heuristics", "loss.nll_normalization=batch")
    rl, nll = _batches(accepted)
    a = accepted.train_step(rl, nll)["nll_loss"]
    b = batch.train_step(rl, nll)["nll_loss"]
    assert b == pytest.approx(a * 3 / 2, rel=1e-6)  # 3 targets, B = 2 prompts
    assert losses.nll_denominator("batch", 3, 2.0) == 2.0 and losses.nll_denominator("accepted", 3, 2.0) == 3.0


def test_selecting_tokens_needs_the_meta_experience_target():
    with pytest.raises(C.ConfigError, match="nll_parts"):
        C.load("configs/tiny.yaml", ["experience.nll_target=correct_rollout", "experience.nll_parts=heuristics"])
    with pytest.raises(C.ConfigError, match="count_match"):
        C.load("configs/tiny.yaml", ["experience.count_match_run_id=run-x"])


# ------------------------------------------------------------------------------ the stages' targets


def _scripted(tmp_path, micro_model, name, script, *more):
    cfg = C.load("configs/tiny.yaml", [f"run.name={name}", f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}",
                                       "sampling.prompts_per_step=6", "sampling.group_size=4", *more])
    return scripted_runtime(cfg, script)


def _quoting_analysis(question: str) -> str:
    """A compact analysis whose critique copies the first differing line of each solution (typed_error's, right)."""
    wrong, right = typed_error(question).splitlines(), solution(question).splitlines()
    k = next(i for i, (w, r) in enumerate(zip(wrong, right)) if w != r)
    return (f"Bifurcation: step {k + 1}\nCritique: {wrong[k]} should be {right[k]}.\n"
            f"Heuristic: If a step uses an earlier result, then copy that result exactly.")


def test_quoted_solution_lines_carry_no_loss_in_the_stored_targets(tmp_path, micro_model):
    rt, base = _scripted(tmp_path, micro_model, "quoted", Script(wrong=typed_error, analysis=_quoting_analysis),
                         "experience.mask_quoted_solution=true", "experience.nll_parts=critique+heuristics")
    run_step(rt, 1, base)
    nll, _ = stages._nll_batch(rt, 1)
    rows = rt.store.query("SELECT a.trained_text, ri.text AS incorrect, rc.text AS correct FROM analyses a "
                          "JOIN pairs pa USING (pair_id) JOIN rollouts ri ON ri.rollout_id = pa.incorrect_rollout_id "
                          "JOIN rollouts rc ON rc.rollout_id = pa.correct_rollout_id WHERE a.status = 'accepted' "
                          "ORDER BY a.analysis_id")
    assert len(rows) == len(nll.target_ids) > 0
    tok = rt.policy.tokenizer
    for row, ids, parts, trained in zip(rows, nll.target_ids, nll.parts, nll.trained):
        assert all(PARTS[p] in ("critique", "heuristics") for p, t in zip(parts, trained) if t)
        critique = [(i, t) for i, p, t in zip(ids, parts, trained) if p == CRIT]
        masked = "".join(tok.decode([i]) for i, t in critique if not t).replace(" ", "")
        kept = "".join(tok.decode([i]) for i, t in critique if t)
        copied = row["trained_text"].split("Critique: ")[1].split(" should be ")
        wrong, right = copied[0], copied[1].split(".\n")[0]
        assert wrong in row["incorrect"].splitlines() and right in row["correct"].splitlines()
        assert masked == wrong + right  # exactly the two copied lines lost their loss
        assert "should be" in kept  # the critique's own words keep theirs
        assert any(t for p, t in zip(parts, trained) if p == HEUR)
    update = rt.store.query("SELECT num_nll_sequences FROM updates")[0]
    assert update["num_nll_sequences"] == len(rows)


def test_distill_learns_the_first_verified_replay_given_the_plain_solve_prompt(tmp_path, micro_model):
    class SecondReplaySolves(Script):
        def write(self, prompt, index):
            if prompt.startswith("Hint:"):  # a replay: the first (index 0) is wrong, the second right
                self.seen.append(prompt)
                question = re.search(r"^Q: (.*)$", prompt, re.MULTILINE).group(1).strip()
                return solution(question, correct=index == 1)
            return super().write(prompt, index)

    rt, base = _scripted(tmp_path, micro_model, "distill", SecondReplaySolves(), "experience.nll_target=accepted_replay",
                         "experience.replays_per_experience=2", "sampling.max_new_tokens=64",
                         "experience.replay_max_new_tokens=64")
    run_step(rt, 1, base)
    nll, any_accepted = stages._nll_batch(rt, 1)
    expected = rt.store.query(
        "SELECT p.prompt_text, rp.token_ids, rp.reward FROM analyses a JOIN pairs pa USING (pair_id) "
        "JOIN prompts p ON p.prompt_id = pa.prompt_id JOIN replays rp ON rp.analysis_id = a.analysis_id "
        "AND rp.replay_index = 1 WHERE a.status = 'accepted' ORDER BY a.analysis_id")
    assert any_accepted and len(expected) == 6 and all(r["reward"] == 1.0 for r in expected)
    assert nll.prompts == [r["prompt_text"] for r in expected]
    assert all(p.startswith("Q: ") and "Hint:" not in p for p in nll.prompts)  # M is not in context
    assert nll.target_ids == [list(r["token_ids"]) for r in expected]
    assert nll.target_ids[0][-1] == rt.policy.tokenizer.eos_token_id  # the replay's own ids, end token included
    assert rt.store.query("SELECT num_nll_sequences FROM updates")[0]["num_nll_sequences"] == 6


@pytest.mark.slow
def test_count_matched_grpo_sft_takes_the_mel_arms_counts_and_runs_no_mel_stage(prefect_harness, tmp_path,
                                                                                 micro_model):
    from flows.compare import compare
    from mel_core.store.reader import StoreReader
    from mel_core.study import ab_test
    from tests.scripted import scripted_runtimes

    cfg = C.load("configs/tiny.yaml", ["run.steps=1", f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}",
                                       "sampling.prompts_per_step=8", "sampling.group_size=4", "eval.max_problems=4",
                                       "eval.k=0"])
    arms = ab_test.parse_arms("grpo+sft,mel,grpo+gold")  # grpo+sft first: the harness must run mel before it
    assert [a.arm for a in ab_test.plan(cfg, "cm", 1, arms)] == ["grpo", "mel", "grpo+sft", "grpo+gold"]
    script = Script(replay_solves=lambda q: sum(map(ord, q)) % 3 != 0)  # mel accepts some of its 8 analyses
    with scripted_runtimes(script):
        report = compare(C.to_dict(cfg), "cm", seeds=1, out=str(tmp_path / "cm.md"), arms=arms)
    run = {r["arm"]: r for r in report["runs"]}
    with StoreReader(run["mel"]["db"]) as mel:
        accepted = mel.query("SELECT count(*) AS n FROM analyses WHERE status = 'accepted'")[0]["n"]
    with StoreReader(run["grpo+sft"]["db"]) as sft:
        pairs = sft.query("SELECT count(DISTINCT correct_rollout_id) AS n FROM pairs")[0]["n"]
        assert 0 < accepted < pairs  # the count is matched, not every pair taken
        update = sft.query("SELECT num_nll_sequences FROM updates")[0]
        assert update["num_nll_sequences"] == accepted
        for table in ("analyses", "heuristics", "replays"):
            assert sft.query(f"SELECT count(*) AS n FROM {table}")[0]["n"] == 0, table
        ran = {r["stage"] for r in sft.query("SELECT DISTINCT stage FROM stage_runs WHERE status = 'completed'")}
        assert ran >= {"sample", "verify", "pair", "update"} and not ran & {"diagnose", "abstract", "replay"}
        config = sft.query("SELECT config_json FROM runs")[0]["config_json"]
        assert run["mel"]["run_id"] in config
    with StoreReader(run["grpo+gold"]["db"]) as gold:  # the flow runs it: sample, verify, update, no pairs
        update = gold.query("SELECT num_nll_sequences FROM updates")[0]
        assert 0 < update["num_nll_sequences"] <= accepted
        assert gold.query("SELECT count(*) AS n FROM pairs")[0]["n"] == 0
        ran = {r["stage"] for r in gold.query("SELECT DISTINCT stage FROM stage_runs WHERE status = 'completed'")}
        assert ran - {"warm_start"} == {"sample", "verify", "update"}


def _solved_by_question(question: str, index: int) -> bool:
    """Groups of 4 that solve 0 to 4 of their rollouts, by question: least-solved first is a real order."""
    return index < sum(map(ord, question)) % 5


def test_gold_trains_the_worlds_solution_of_each_problem_not_always_solved_least_solved_first(tmp_path, micro_model):
    from mel_core.problems.worlds import arithmetic

    rt, base = _scripted(tmp_path, micro_model, "gold", Script(solved=_solved_by_question),
                         "experience.nll_target=reference_solution")
    assert C.step_stages(rt.cfg) == ("sample", "verify", "update")  # no pair, analysis or replay
    run_step(rt, 1, base, experience_stages=False)
    nll, any_target = stages._nll_batch(rt, 1)
    prompts = rt.store.query("SELECT p.position, p.question, p.prompt_text, avg(r.reward) AS solved FROM prompts p "
                             "JOIN rollouts r USING (prompt_id) GROUP BY ALL ORDER BY p.position")
    unsolved = sorted((p for p in prompts if p["solved"] < 1), key=lambda p: (p["solved"], p["position"]))
    assert 0 < len(unsolved) < len(prompts)  # the script made some groups all right, some not
    assert any_target and nll.prompts == [p["prompt_text"] for p in unsolved]
    tok = rt.policy.tokenizer
    for p, ids in zip(unsolved, nll.target_ids):
        assert ids[-1] == rt.stop_ids[0]
        assert tok.decode(ids[:-1]) == "\n".join(arithmetic.solution_lines(p["question"]))  # the world's, not a rollout
    assert [p["solved"] for p in unsolved] == sorted(p["solved"] for p in unsolved)
    assert rt.store.query("SELECT num_nll_sequences FROM updates")[0]["num_nll_sequences"] == len(unsolved)
    assert rt.store.query("SELECT count(*) AS n FROM pairs")[0]["n"] == 0


def test_count_matched_gold_takes_as_many_least_solved_problems_as_the_matched_run_accepted(tmp_path, micro_model):
    src, src_base = _scripted(tmp_path, micro_model, "src", Script(solved=_solved_by_question,
                                                                  replay_solves=lambda q: len(q) % 2 == 0))
    run_step(src, 1, src_base)
    src.store.publish()  # what the flow does after each stage: readers (the matched run's count) see it
    accepted = src.store.query("SELECT count(*) AS n FROM analyses WHERE status = 'accepted'")[0]["n"]
    rt, base = _scripted(tmp_path, micro_model, "gold-cm", Script(solved=_solved_by_question),
                         "experience.nll_target=reference_solution", f"experience.count_match_run_id={src.run_id}",
                         f"experience.count_match_store={src.store.path}")
    run_step(rt, 1, base, experience_stages=False)
    nll, _ = stages._nll_batch(rt, 1)
    unsolved = rt.store.query("SELECT p.prompt_text FROM prompts p JOIN rollouts r USING (prompt_id) GROUP BY ALL "
                              "HAVING avg(r.reward) < 1 ORDER BY avg(r.reward), any_value(p.position)")
    assert 0 < accepted < len(unsolved)  # the count is matched, not every unsolved problem taken
    assert nll.prompts == [p["prompt_text"] for p in unsolved[:accepted]]
    with pytest.raises(C.ConfigError, match="experience.nll_target.*reference_solution trains on an embedded world"):
        C.load("configs/tiny.yaml", ["experience.nll_target=reference_solution", "data.source=data/x.jsonl"])
