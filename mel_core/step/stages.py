"""The seven stages of one MEL step, as plain functions over the runtime and the store.

sample -> verify -> pair -> diagnose -> abstract -> replay -> update (docs/DESIGN.md, "The algorithm"). Each
reads its inputs by (run, step) through the named reads of ``mel_core.store``, computes, and writes its
records with deterministic ids; it returns a small manifest (ids and counts), never tensors. ``tasks/`` wraps
each in a Prefect task and ``mel_core.run.executions.execute`` records each execution; calling them directly
runs the same step without an orchestrator (the benchmarks and many tests do).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mel_core import config as config_mod
from mel_core.algorithm import losses, meta_experience, nll_targets, pairing, replay_filter, retrospective
from mel_core.ids import derive_seed, make_id
from mel_core.model.checkpoints import Checkpoint, file_digests, portable_path, saved_update_stats
from mel_core.model.engines.base import SamplingParams, generate_together
from mel_core.problems import worlds
from mel_core.step import analysts
from mel_core.step.runtime import Runtime
from mel_core.store import library, stage_records
from mel_core.tokens import encode_target, token_offsets

# Bump a stage's version when its logic changes, so cached results of the old logic are not reused.
STAGE_VERSIONS = {"warm_start": 2, "sample": 1, "verify": 2, "pair": 2, "diagnose": 2, "abstract": 3,
                  "replay": 1, "update": 2}

# ---------------------------------------------------------------------------------- 1. sample


def experience_step(rt: Runtime, step: int) -> int:
    """The step whose pairs step `step` analyses (abstract, replay) and whose accepted meta-experience its update
    trains on: the step itself, or with orchestration.overlap the one before (its analyses were generated in this
    step's rollout batch)."""
    return step - rt.cfg.orchestration.overlap


def sample(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """B prompts x G rollouts from pi_old at the rollout temperature, in one engine call. With
    orchestration.overlap, the analyses of the previous step's pairs are generated in the same call (by the same
    policy, pi_old of this step) and written with this step's rollouts."""
    cfg = rt.cfg
    rt.ensure_version(ckpt)
    problems = rt.step_problems(step)
    prompt_rows = [{"prompt_id": make_id("prompt", rt.run_id, step, pos, prob.problem_id), "run_id": rt.run_id,
                    "step": step, "position": pos, "problem_id": prob.problem_id, "question": prob.question,
                    "answer": prob.answer, "prompt_text": rt.model_input(rt.prompts.render_solve(prob.question)),
                    "row_json": prob.row_json}
                   for pos, prob in enumerate(problems)]
    seed = derive_seed(cfg.run.seed, step, "sample")
    params = SamplingParams(n=cfg.sampling.group_size, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                            max_new_tokens=cfg.sampling.max_new_tokens, seed=seed)
    rollout_prompts = [r["prompt_text"] for r in prompt_rows]
    analysed = experience_step(rt, step)
    analyses_here = analysed < step and "diagnose" in config_mod.step_stages(cfg)  # overlap: step t-1's, in this batch
    pending = _analyses_to_write(rt, analysed, ckpt) if analyses_here else None
    if pending is not None and pending.prompts and cfg.experience.analyst == "policy":
        groups, analysis_groups = generate_together(
            rt.engine, [(rollout_prompts, params), (pending.prompts, _analysis_params(rt, analysed, "diagnose"))],
            desc=f"sample step {step} + diagnose step {analysed}")
        analysis_outs = [c for (c,) in analysis_groups]
    else:
        groups = rt.engine.generate(rollout_prompts, params, desc=f"sample step {step}")
        analysis_outs = _write_analyses(rt, analysed, pending) if pending is not None else []
    # The previous update's checkpoint was written while this step generated (run.async_save): its rows commit
    # before any of this step's, so no record of step t+1 exists unless step t's checkpoint and rows do.
    rt.settle_saves()
    rollout_rows = [{"rollout_id": make_id("rollout", pr["prompt_id"], i, ckpt.checkpoint_id),
                     "prompt_id": pr["prompt_id"], "run_id": rt.run_id, "step": step, "sample_index": i,
                     "policy_version_id": ckpt.checkpoint_id, "text": c.text, "token_ids": c.token_ids,
                     "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                    for pr, completions in zip(prompt_rows, groups) for i, c in enumerate(completions)]
    analysis_rows, counts = _analysis_records(rt, analysed, ckpt, pending, analysis_outs) if pending else ([], {})
    with rt.store.transaction() as w:
        w.insert("steps", [{"step_id": make_id("step", rt.run_id, step), "run_id": rt.run_id, "step": step,
                            "policy_version_id": ckpt.checkpoint_id, "seed": seed}])
        w.insert("prompts", prompt_rows)
        w.insert("rollouts", rollout_rows)
        if pending:
            w.insert("analyses", analysis_rows)
            w.insert("metrics", stage_records.metric_rows(rt.run_id, analysed, counts))
    return {"step": step, "prompts": len(prompt_rows), "rollouts": len(rollout_rows),
            "tokens": sum(r["num_tokens"] for r in rollout_rows),
            **({"analysed_step": analysed, **counts} if pending else {})}


# ---------------------------------------------------------------------------------- 2. verify


def verify(rt: Runtime, step: int) -> dict:
    """Binary reward per rollout; unparsable output scores 0 with its reason, never a crash."""
    rows = stage_records.rollouts_to_verify(rt.store, rt.run_id, step)
    verdicts = rt.verifier.verify([r["text"] for r in rows], [r["answer"] for r in rows],
                                  [r["finish_reason"] for r in rows], problems=rows)
    groups: dict[str, list[float]] = defaultdict(list)
    for r, v in zip(rows, verdicts):
        groups[r["prompt_id"]].append(v.reward)
    reward_mean = sum(v.reward for v in verdicts) / max(len(verdicts), 1)
    # Logged here, not in pair, so a GRPO-only run (no pair stage) reports them too: only mixed groups
    # carry a learning signal under group-normalised advantages.
    mixed = sum(pairing.is_mixed(g) for g in groups.values())
    verifier = stage_records.verifier_row(rt.verifier)
    with rt.store.transaction() as w:
        w.insert("verifiers", [verifier])
        w.update("rollouts", "rollout_id", [{"rollout_id": r["rollout_id"], "reward": v.reward,
                                             "extracted_answer": v.extracted, "verify_reason": v.reason,
                                             "verifier_hash": verifier["verifier_hash"]}
                                            for r, v in zip(rows, verdicts)])
        w.insert("metrics", stage_records.metric_rows(rt.run_id, step, {"reward_mean": reward_mean, "mixed_groups": mixed,
                                                                   "groups": len(groups)}))
    return {"step": step, "verified": len(rows), "reward_mean": reward_mean, "mixed_groups": mixed}


# ------------------------------------------------------------------------------------ 3. pair


def pair(rt: Runtime, step: int) -> dict:
    """Contrastive pairs from mixed groups only."""
    groups = stage_records.reward_groups(rt.store, rt.run_id, step)
    pairs = pairing.make_pairs(groups, rt.cfg.experience.pairs_per_group, derive_seed(rt.cfg.run.seed, step, "pair"),
                                  strategy=rt.cfg.experience.pairing)
    rows = [{"pair_id": make_id("pair", p.prompt_id, p.correct_rollout_id, p.incorrect_rollout_id), "run_id": rt.run_id,
             "step": step, "prompt_id": p.prompt_id, "correct_rollout_id": p.correct_rollout_id,
             "incorrect_rollout_id": p.incorrect_rollout_id} for p in pairs]
    with rt.store.transaction() as w:
        w.insert("pairs", rows)
        w.insert("metrics", stage_records.metric_rows(rt.run_id, step, {"pairs": len(rows)}))
    return {"step": step, "pairs": len(rows)}


# -------------------------------------------------------------------------------- 4. diagnose


def _analysis_params(rt: Runtime, step: int, stage: str) -> SamplingParams:
    cfg = rt.cfg
    return SamplingParams(n=1, temperature=cfg.experience.analysis_temperature,
                          max_new_tokens=cfg.experience.analysis_max_new_tokens,
                          seed=derive_seed(cfg.run.seed, step, stage))


def retrospective_prompt(rt: Runtime, render, incorrect: str, correct: str) -> retrospective.Fitted:
    """The analysis prompt for (y-, y+) within the window, its head kept (mel_core.algorithm.retrospective): the prompt,
    its analysis and the eos must fit model.max_seq_len, since the NLL learns M given exactly this prompt."""
    budget = rt.context_limit - rt.cfg.experience.analysis_max_new_tokens
    return retrospective.fit(lambda y_minus, y_plus: rt.model_input(render(y_minus, y_plus)), incorrect, correct,
                             budget, rt.policy.tokenizer, lambda text: len(rt.policy.encode_prompts([text])[0]),
                             rt.cfg.experience.long_context)


@dataclass
class PendingAnalyses:
    """The pairs of a step to analyse and their analysis prompts within the window (None: did not fit)."""
    pairs: list[dict]
    fitted: list[retrospective.Fitted]

    @property
    def todo(self) -> list[tuple[dict, retrospective.Fitted]]:
        return [(p, f) for p, f in zip(self.pairs, self.fitted) if f.prompt is not None]

    @property
    def prompts(self) -> list[str]:
        return [f.prompt for _, f in self.todo]

    def __bool__(self) -> bool:
        return bool(self.pairs)


def _analyses_to_write(rt: Runtime, step: int, ckpt: Checkpoint) -> PendingAnalyses:
    """Load: the step's pairs and the prompt that asks `ckpt`'s policy for each one's analysis."""
    pairs = stage_records.pairs_with_texts(rt.store, rt.run_id, step)
    if pairs:
        rt.ensure_version(ckpt)
    render = rt.prompts.render_diagnose if rt.cfg.experience.analysis_mode == "two_pass" else rt.prompts.render_analysis
    return PendingAnalyses(pairs, [retrospective_prompt(rt, lambda a, b, q=p["question"]: render(q, a, b),
                                                        p["incorrect"], p["correct"]) for p in pairs])


def _write_analyses(rt: Runtime, step: int, pending: PendingAnalyses) -> list:
    """Compute: one analysis per pair that fits, by the configured analyst, in one batched call."""
    todo = pending.todo
    return analysts.write(rt, "diagnose", [p for p, _ in todo], pending.prompts, _analysis_params(rt, step, "diagnose"),
                          desc=f"diagnose step {step}") if todo else []


def _analysis_records(rt: Runtime, step: int, ckpt: Checkpoint, pending: PendingAnalyses,
                      outs: list) -> tuple[list[dict], dict]:
    """The analyses' rows (each parsed for s* and C, or rejected with its reason) and the stage's counts."""
    analysis_rows = [_skipped_analysis(rt, step, ckpt, p) for p, f in zip(pending.pairs, pending.fitted)
                     if f.prompt is None]
    for (p, f), c in zip(pending.todo, outs):
        parsed = meta_experience.parse_diagnosis(c.text)
        reason = ("truncated" if c.finish_reason == "length" else
                  "no_known_error" if c.text == analysts.UNKNOWN_ERROR else parsed.reject_reason)
        analysis_rows.append({
            "analysis_id": make_id("analysis", p["pair_id"], ckpt.checkpoint_id), "pair_id": p["pair_id"],
            "run_id": rt.run_id, "step": step, "policy_version_id": ckpt.checkpoint_id, "prompt_text": f.prompt,
            "retro_shortened": f.shortened, "raw_text": c.text, "token_ids": c.token_ids,
            "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
            "bifurcation_step": parsed.bifurcation_step, "bifurcation": parsed.bifurcation,
            "critique": parsed.critique, "parsed": reason is None,
            "status": "diagnosed" if reason is None else "rejected", "reject_reason": reason,
            "mode": rt.cfg.experience.analysis_mode, "analyst": rt.cfg.experience.analyst})
    counts = {"analyses": len(outs), "diagnosed": sum(r["status"] == "diagnosed" for r in analysis_rows),
              "truncated": sum(r["reject_reason"] == "truncated" for r in analysis_rows),
              "retro_shortened": sum(f.shortened for f in pending.fitted),
              "retro_skipped": sum(f.prompt is None for f in pending.fitted)}
    return analysis_rows, counts


def diagnose(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """The policy reads [I, x, y-, y+] and writes s* and C — one batched call over the step's pairs.

    single_pass: the same generation goes on to the heuristics, which `abstract` parses. two_pass: the
    diagnosis part alone is kept (and is the NLL target), and `abstract` asks for H in a second call. An
    analysis cut off by the length limit is rejected as `truncated`: never replayed, never trained on.
    """
    pending = _analyses_to_write(rt, step, ckpt)
    if not pending:
        return {"step": step, "analyses": 0, "diagnosed": 0}
    analysis_rows, counts = _analysis_records(rt, step, ckpt, pending, _write_analyses(rt, step, pending))
    with rt.store.transaction() as w:
        w.insert("analyses", analysis_rows)
        w.insert("metrics", stage_records.metric_rows(rt.run_id, step, counts))
    return {"step": step, **counts}


def _skipped_analysis(rt: Runtime, step: int, ckpt: Checkpoint, p: dict) -> dict:
    """The record of a pair whose retrospective context did not fit (experience.long_context: skip)."""
    return {"analysis_id": make_id("analysis", p["pair_id"], ckpt.checkpoint_id), "pair_id": p["pair_id"],
            "run_id": rt.run_id, "step": step, "policy_version_id": ckpt.checkpoint_id, "parsed": False,
            "status": "rejected", "reject_reason": "context_too_long", "mode": rt.cfg.experience.analysis_mode}


# -------------------------------------------------------------------------------- 5. abstract


def _trained(rt: Runtime, parsed: meta_experience.ParsedAnalysis) -> tuple[list[int], list[int]]:
    """The NLL target of a parsed generation: M*'s ids and the token that ends a completion (eos, or the chat
    template's end of turn: what the generation itself stopped on), and the part of M each id belongs to."""
    return encode_target(rt.policy.tokenizer, parsed.target_text, parsed.spans, meta_experience.PARTS,
                         end_id=rt.stop_ids[0])


def abstract(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """Subject heuristics H (If/Then, no problem specifics) for each diagnosed analysis, and M*: the text
    that is trained on (the generation up to its last kept rule) and the text a replay shows.

    single_pass parses them from the diagnose generation; two_pass generates them in one batched call
    conditioned on the question, both solutions and the diagnosis (s*, C).
    """
    rows = stage_records.pairs_with_texts(rt.store, rt.run_id, step, ("diagnosed", "candidate"))
    if rows:
        rt.ensure_version(ckpt)
    gold = lambda r: {"gold_answer": r["answer"], "question": r["question"],
                      "max_heuristics": rt.cfg.experience.max_heuristics}
    updates = []
    if rt.cfg.experience.analysis_mode == "two_pass":
        diagnoses = [meta_experience.parse_diagnosis(r["raw_text"]) for r in rows]
        fitted = [retrospective_prompt(rt, lambda a, b, r=r, d=d: rt.prompts.render_abstract(r["question"], a, b,
                                                                                       d.target_text),
                                 r["incorrect"], r["correct"]) for r, d in zip(rows, diagnoses)]
        todo = [i for i, f in enumerate(fitted) if f.prompt is not None]
        outs = analysts.write(rt, "abstract", [rows[i] for i in todo], [fitted[i].prompt for i in todo],
                              _analysis_params(rt, step, "abstract"), desc=f"abstract step {step}") if todo else []
        generated = dict(zip(todo, outs))
        for i, (r, d, f) in enumerate(zip(rows, diagnoses, fitted)):
            c = generated.get(i)
            h = meta_experience.parse_heuristics(c.text, **gold(r)) if c else None
            m = meta_experience.combine(d, h) if h else d
            reason = ("context_too_long" if c is None else "truncated" if c.finish_reason == "length"
                      else m.reject_reason)
            row = {"analysis_id": r["analysis_id"], "abstract_prompt_text": f.prompt,
                   "abstract_text": c.text if c else None, "abstract_token_ids": c.token_ids if c else None,
                   "abstract_finish_reason": c.finish_reason if c else None}
            if reason is None:
                d_ids, d_parts = _trained(rt, d)
                h_ids, h_parts = _trained(rt, h)
                row.update(trained_text=d.target_text, trained_token_ids=d_ids, trained_parts=d_parts,
                           abstract_trained_text=h.target_text, abstract_trained_token_ids=h_ids,
                           abstract_trained_parts=h_parts, trained_tokens=len(d_ids) + len(h_ids))
            updates.append((r, m, reason, row))
    else:
        for r in rows:
            m = meta_experience.parse_analysis(r["raw_text"], **gold(r))
            row = {"analysis_id": r["analysis_id"]}
            if m.ok:
                ids, parts = _trained(rt, m)
                row.update(trained_text=m.target_text, trained_token_ids=ids, trained_parts=parts,
                           trained_tokens=len(ids))
            updates.append((r, m, m.reject_reason, row))

    status_rows, heuristic_rows = [], []
    for r, m, reason, row in updates:
        ok = reason is None
        replay_text = meta_experience.render_experience(m, rt.cfg.experience.replay_context) if ok else None
        status_rows.append({**row, "status": "candidate" if ok else "rejected", "parsed": ok, "reject_reason": reason,
                            "replay_text": replay_text})
        heuristic_rows += [{"heuristic_id": make_id("heuristic", r["analysis_id"], i), "analysis_id": r["analysis_id"],
                            "run_id": rt.run_id, "step": step, "position": i, "text": h}
                           for i, h in enumerate(m.heuristics if ok else [])]
    candidates = sum(s["status"] == "candidate" for s in status_rows)
    truncated = sum(s["reject_reason"] == "truncated" for s in status_rows)
    with rt.store.transaction() as w:
        w.update("analyses", "analysis_id", status_rows)
        w.insert("heuristics", heuristic_rows)
        # Near-duplicates join the run's heuristic library as soon as their text exists (mel_core.store.library).
        library.assign_clusters(w, rt.run_id, rt.cfg.library.similarity_threshold)
        metrics = {"candidates": candidates}
        if rt.cfg.experience.analysis_mode == "two_pass":
            metrics["abstract_truncated"] = truncated
        w.insert("metrics", stage_records.metric_rows(rt.run_id, step, metrics))
    return {"step": step, "candidates": candidates, "heuristics": len(heuristic_rows)}


# ---------------------------------------------------------------------------------- 6. replay


def replay(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """Re-solve each question with its M in context (one batched call); accept M if replays verify.

    The replay prompt is the validation prompt of the prompt set with M as written by abstract
    (experience.replay_context: the whole M = (s*, C, H), the paper's Eq. 6, or its heuristics alone). With
    experience.transfer_replays, M must also do no worse on other problems of its cluster; with
    experience.filter: none, every candidate is kept (the replays are still run and recorded)."""
    cfg = rt.cfg.experience
    rows = [r for r in stage_records.analyses_to_replay(rt.store, rt.run_id, step) if r["heuristics"]]
    if not rows:
        with rt.store.transaction() as w:  # retention of 0/0 is undefined: not logged
            w.insert("metrics", stage_records.metric_rows(rt.run_id, step, {"accepted": 0}))
        return {"step": step, "candidates": 0, "accepted": 0, "retention_ratio": None}
    rt.ensure_version(ckpt)
    params = SamplingParams(n=cfg.replays_per_experience, temperature=cfg.replay_temperature,
                            max_new_tokens=cfg.replay_max_new_tokens, seed=derive_seed(rt.cfg.run.seed, step, "replay"))
    own, replay_rows = _replays(rt, step, [(r, r) for r in rows], params, "self", desc=f"replay step {step}")
    passed = {r["analysis_id"]: replay_filter.accept(own[r["analysis_id"]], cfg.accept_min_correct) for r in rows}
    transferred, transfer_rows = _transfer(rt, step, rows) if cfg.transfer_replays else ({}, [])
    decided = [(a, cfg.filter == "none" or (ok and transferred.get(a, True))) for a, ok in passed.items()]
    accepted = sum(ok for _, ok in decided)
    ratio = replay_filter.retention_ratio(accepted, len(rows))
    metrics = {"accepted": accepted, "retention_ratio": ratio, "replay_passed": sum(passed.values())}
    if cfg.transfer_replays:
        metrics["transfer_rejected"] = sum(passed[a] and not ok for a, ok in transferred.items())
    with rt.store.transaction() as w:
        w.insert("verifiers", [stage_records.verifier_row(rt.verifier)])
        w.insert("replays", replay_rows + transfer_rows)
        w.update("analyses", "analysis_id", [{"analysis_id": a, "status": "accepted" if ok else "rejected",
                                              "reject_reason": None if ok else _why_not(passed[a], transferred.get(a))}
                                             for a, ok in decided])
        stage_records.mark_replayed(w, rt.run_id, step)
        w.insert("metrics", stage_records.metric_rows(rt.run_id, step, metrics))
    return {"step": step, "candidates": len(rows), "accepted": accepted, "retention_ratio": ratio}


def _why_not(passed: bool, transferred: bool | None) -> str:
    return "transfer_failed" if passed and transferred is False else "replay_failed"


def _replays(rt: Runtime, step: int, jobs: list[tuple[dict, dict]], params: SamplingParams, kind: str,
             desc: str) -> tuple[dict[str, list[float]], list[dict]]:
    """Solve each (analysis, problem) job with the analysis's M in context: rewards per analysis, and the rows."""
    prompts = [rt.model_input(rt.prompts.render_validation(problem["question"], a["replay_text"]))
               for a, problem in jobs]
    solved = rt.solve(prompts, [problem["answer"] for _, problem in jobs], params, desc=desc,
                      problems=[problem for _, problem in jobs])
    rewards, rows = defaultdict(list), []
    verifier_hash = rt.verifier.identity_hash
    for s in solved:
        a, problem = jobs[s.prompt_index]
        rewards[a["analysis_id"]].append(s.verdict.reward)
        key = ("replay", a["analysis_id"], s.sample_index) if kind == "self" else \
            ("replay", a["analysis_id"], kind, problem["prompt_id"], s.sample_index)
        rows.append({"replay_id": make_id(*key), "analysis_id": a["analysis_id"], "run_id": rt.run_id, "step": step,
                     "replay_index": s.sample_index, "prompt_text": prompts[s.prompt_index], "text": s.completion.text,
                     "token_ids": s.completion.token_ids,
                     "reward": s.verdict.reward, "verify_reason": s.verdict.reason, "kind": kind,
                     "prompt_id": problem["prompt_id"], "finish_reason": s.completion.finish_reason,
                     "extracted_answer": s.verdict.extracted, "verifier_hash": verifier_hash})
    return rewards, rows


def _transfer(rt: Runtime, step: int, rows: list[dict]) -> tuple[dict[str, bool], list[dict]]:
    """experience.transfer_replays: for each candidate M, up to k other problems of the step whose heuristics
    share a cluster with M's, solved once each with M in context; M passes when it solves them no less often than
    their own rollouts did (none found: nothing to check, it passes). Returns the verdicts and the replays' rows."""
    k = rt.cfg.experience.transfer_replays
    unaided = stage_records.prompt_reward_means(rt.store, rt.run_id, step)
    jobs = []
    for a in rows:
        others = {b["prompt_id"]: b for b in rows
                  if b["prompt_id"] != a["prompt_id"] and set(a["clusters"]) & set(b["clusters"])}
        jobs += [(a, others[p]) for p in sorted(others)[:k]]
    if not jobs:
        return {}, []
    params = SamplingParams(n=1, temperature=rt.cfg.experience.replay_temperature,
                            max_new_tokens=rt.cfg.experience.replay_max_new_tokens,
                            seed=derive_seed(rt.cfg.run.seed, step, "transfer"))
    rewards, transfer_rows = _replays(rt, step, jobs, params, "transfer", desc=f"transfer step {step}")
    baseline = defaultdict(list)
    for a, problem in jobs:
        baseline[a["analysis_id"]].append(unaided[problem["prompt_id"]])
    return {a: sum(r) / len(r) >= sum(baseline[a]) / len(baseline[a]) for a, r in rewards.items()}, transfer_rows


# ---------------------------------------------------------------------------------- 7. update


def _rl_batch(rt: Runtime, step: int):
    """The step's rollouts with group-standardised advantages (loss.advantage)."""
    from mel_core.model.policy import RLBatch

    rollouts = stage_records.rollouts_to_train(rt.store, rt.run_id, step)
    group_index = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in rollouts))}
    rewards = torch.tensor([r["reward"] for r in rollouts], dtype=torch.float32)  # [B*G]
    group_ids = torch.tensor([group_index[r["prompt_id"]] for r in rollouts])  # [B*G]
    advantages = losses.get_advantage(rt.cfg.loss.advantage)(rewards, group_ids)  # [B*G]
    return RLBatch(prompts=[r["prompt_text"] for r in rollouts], completion_ids=[r["token_ids"] for r in rollouts],
                   advantages=advantages)


def _nll_batch(rt: Runtime, step: int):
    """What the NLL term trains on (experience.nll_target): the accepted M* given their retrospective contexts (in
    two_pass M spans two generations, each learned given its own prompt), with loss on the tokens nll_parts and
    mask_quoted_solution keep; or y+ / a verified replay given the solve prompt. Empty when MEL is off (a GRPO
    run) or nothing was accepted."""
    from mel_core.model.policy import NLLBatch

    exp = rt.cfg.experience
    if not (exp.enabled and rt.cfg.loss.nll_coef > 0):
        return NLLBatch(prompts=[], target_ids=[]), False
    if exp.nll_target != "meta_experience":  # grpo+sft, grpo+gold, mel-distill: a solution given the solve prompt
        rows = _solution_targets(rt, step)
        return NLLBatch(prompts=[r["prompt_text"] for r in rows], target_ids=[r["token_ids"] for r in rows]), bool(rows)
    accepted = stage_records.accepted_targets(rt.store, rt.run_id, step)
    targets = [(a["prompt_text"], a["trained_text"], a["trained_token_ids"], a["trained_parts"], a)
               for a in accepted]
    targets += [(a["abstract_prompt_text"], a["abstract_trained_text"], a["abstract_trained_token_ids"],
                 a["abstract_trained_parts"], a) for a in accepted if a["abstract_trained_token_ids"]]
    selecting = exp.nll_parts != "all" or exp.mask_quoted_solution
    masks = [_loss_mask(rt, text, ids, parts, a) if selecting else None for _, text, ids, parts, a in targets]
    kept = [(t, m) for t, m in zip(targets, masks) if m is None or any(m)]  # a target with no trained token: none
    return NLLBatch(prompts=[t[0] for t, _ in kept], target_ids=[t[2] for t, _ in kept],
                    parts=[t[3] for t, _ in kept], part_names=meta_experience.PARTS,
                    trained=[m for _, m in kept] if selecting else None), bool(accepted)


def _solution_targets(rt: Runtime, step: int) -> list[dict]:
    """accepted_replay (mel-distill): each accepted M's first verified replay; reference_solution (grpo+gold): the
    world's solutions of the problems the policy did not always solve; correct_rollout (grpo+sft): the accepted
    pairs' correct rollouts, or with count matching as many paired ones as the matched run accepted."""
    exp = rt.cfg.experience
    if exp.nll_target == "accepted_replay":
        replays = stage_records.accepted_replays(rt.store, rt.run_id, step)
        return [{**r, "token_ids": _replay_ids(rt, r)} for r in replays]
    if exp.nll_target == "reference_solution":
        return _reference_solutions(rt, step)
    if exp.count_match_run_id:
        return _count_matched_rollouts(rt, step)
    return stage_records.accepted_correct_rollouts(rt.store, rt.run_id, step)


def _loss_mask(rt: Runtime, text: str, ids: list[int], parts: list[int], analysis: dict) -> list[int]:
    """Which ids of a stored M* target carry loss (nll_targets.loss_mask); the critique's quotes of the pair's
    solutions are found in its text (its ids without the end token)."""
    quoted = None
    if rt.cfg.experience.mask_quoted_solution:
        lines = nll_targets.quotable_lines([analysis["incorrect"], analysis["correct"]])
        offsets = token_offsets(rt.policy.tokenizer, text, ids[:-1])
        quoted = nll_targets.tokens_within(text, offsets, nll_targets.quoted_spans(text, lines))
    return nll_targets.loss_mask(parts, meta_experience.PARTS, rt.cfg.experience.nll_parts, quoted)


def _replay_ids(rt: Runtime, replay: dict) -> list[int]:
    """A replay's completion ids as generated (stores before replays kept them: its text encoded, with the end token
    the generation stopped on)."""
    if replay["token_ids"] is not None:
        return list(replay["token_ids"])
    ids, _ = encode_target(rt.policy.tokenizer, replay["text"], [], (), end_id=rt.stop_ids[0])
    return ids if replay["finish_reason"] == "stop" else ids[:-1]


def _count_matched_rollouts(rt: Runtime, step: int) -> list[dict]:
    """grpo+sft count-matched (experience.count_match_run_id): as many distinct correct rollouts of this step's pairs
    as the matched run accepted at this step (fewer when this step has fewer)."""
    n = _matched_count(rt, step)
    return stage_records.paired_correct_rollouts(rt.store, rt.run_id, step, n) if n else []


def _reference_solutions(rt: Runtime, step: int) -> list[dict]:
    """grpo+gold (nll_target reference_solution): the world's correct solution of each problem of the step that not
    every rollout solved, least solved first; count-matched, only as many as the matched run accepted."""
    world = worlds.get(rt.cfg.data.synthetic.world)
    problems = stage_records.unsolved_problems(rt.store, rt.run_id, step)
    if rt.cfg.experience.count_match_run_id:
        problems = problems[:_matched_count(rt, step)]
    end_id = rt.stop_ids[0]
    return [{"prompt_text": p["prompt_text"],
             "token_ids": encode_target(rt.policy.tokenizer, "\n".join(world.solution_lines(p["question"])), [], (),
                                        end_id=end_id)[0]} for p in problems]


def _matched_count(rt: Runtime, step: int) -> int:
    """How many analyses the run named by experience.count_match_run_id accepted at this step."""
    from mel_core.store.reader import StoreReader

    exp = rt.cfg.experience
    with StoreReader(exp.count_match_store) as other:
        n = stage_records.accepted_count(other, exp.count_match_run_id, step)
    if n is None:
        raise config_mod.ConfigError(f"config key 'experience.count_match_run_id': run {exp.count_match_run_id} in "
                                     f"{exp.count_match_store} has no accepted count at step {step} (run it first)")
    return n


def _distributed_update(rt: Runtime, ckpt: Checkpoint, new: Checkpoint, rl, nll) -> dict:
    """The step on optim.fsdp_processes torchrun processes (mel_core/model/distributed.py); the flow's own policy
    then loads the checkpoint they wrote, to generate from it."""
    from mel_core.atomic_files import write_dir_atomically
    from mel_core.model import distributed

    write_dir_atomically(new.path, lambda tmp: distributed.launch(config_mod.to_dict(rt.cfg), ckpt.path, rl, nll, tmp,
                                                                  rt.cfg.optim.fsdp_processes))
    rt.ensure_version(new)
    return saved_update_stats(new.path)  # written beside the weights by rank 0


def _train(rt: Runtime, ckpt: Checkpoint, new: Checkpoint, rl, nll) -> tuple[dict, Callable[[Path], None] | None]:
    """Train the step and write `new`, or — when a process died after writing it and before the commit — take
    the checkpoint on disk as it is, rather than train again and trust the step to reproduce the same weights
    (non-deterministic GPU kernels would not). Returns the stats and, when the checkpoint is left to be written in
    the background (run.async_save), its writer (the policy's state as of this step, in host memory); else None."""
    stats = saved_update_stats(new.path)
    if stats is not None:
        rt.ensure_version(new)
        return stats, None
    rt.ensure_version(ckpt)
    if rt.cfg.optim.fsdp_processes > 1:
        return _distributed_update(rt, ckpt, new, rl, nll), None
    write = None
    try:
        stats = rt.policy.train_step(rl, nll)
        if rt.saves_in_background:
            write = rt.policy.checkpoint_writer(update_stats=stats)
        else:
            rt.policy.save_checkpoint(new.path, update_stats=stats)
    except BaseException:
        # The weights may have moved before the failure (a refused step, a failed save): the next use of
        # this process's policy, e.g. the retry, must reload `ckpt` instead of training on from them.
        rt.forget_version()
        raise
    # The HF engine's module holds the new weights already; vLLM is handed them in memory. Neither reads the
    # directory, which is why the engine moves before a background save has written it.
    rt.trained_to(new)
    return stats, write


def _new_checkpoint(rt: Runtime, step: int, ckpt: Checkpoint) -> Checkpoint:
    return Checkpoint(make_id("ckpt", rt.run_id, step, ckpt.checkpoint_id), str(rt.checkpoint_dir / f"step-{step:05d}"))


def recorded_update(rt: Runtime, step: int, ckpt: Checkpoint) -> dict | None:
    """The manifest of the step's update from `ckpt` if its rows are committed (its checkpoint is then whole on
    disk: rows commit only after the directory is in place), else None. Reads one row, loads nothing."""
    new = _new_checkpoint(rt, step, ckpt)
    row = stage_records.committed_update(rt.store, rt.run_id, step, new.checkpoint_id)
    return None if row is None else {"step": step, "checkpoint": new, "loss": row["loss"], "nll_loss": row["nll_loss"]}


def update(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """One optimizer step on L_RL + lambda * L_NLL; the checkpoint with its files' digests, the update row and the
    "internalized" links commit together after the checkpoint directory is in place — here, or with run.async_save
    when the runtime settles the background save (the next step's sample, or whatever reads the checkpoint first).

    The store, not an orchestrator's cache, says whether the update is done: committed rows are returned as they
    are; a checkpoint whole on disk without rows (its process died before the commit) is taken; else it trains."""
    rt.settle_saves()  # one save in flight at most; and it may be this very update's, from an earlier call
    done = recorded_update(rt, step, ckpt)
    if done is not None:
        return done
    rl = _rl_batch(rt, step)
    nll, any_accepted = _nll_batch(rt, experience_step(rt, step))  # with orchestration.overlap: the step before's M
    new = _new_checkpoint(rt, step, ckpt)
    stats, write = _train(rt, ckpt, new, rl, nll)
    if not stats["num_nll_sequences"]:
        stats["nll_loss"] = None  # the NLL of no sequences is undefined, not zero: NULL, and no metric
    learned = stage_records.accepted_heuristics(rt.store, rt.run_id, experience_step(rt, step)) if any_accepted else []
    # Digests of the files as written — or, after a crash before the commit, as the dead process left them: every
    # later load checks them (Runtime.ensure_version). A background save fills them in on its thread.
    rows = stage_records.update_records(rt.run_id, step, ckpt.checkpoint_id, new.checkpoint_id,
                                        portable_path(new.path, rt.run_dir), stats, learned,  # movable runs
                                        [] if write is not None else file_digests(new.path))
    if write is not None:
        def write_and_digest(tmp: Path) -> None:
            # Digests of the files as written, on the save thread (off the critical path); names are relative, so the
            # temp directory's are the renamed one's. The rows commit after the thread is done (settle_saves).
            write(tmp)
            rows["checkpoint_files"] += stage_records.checkpoint_file_rows(new.checkpoint_id, file_digests(tmp))
        rt.save_in_background(step, new, write_and_digest, rows)
    else:
        with rt.store.transaction() as w:
            for table, table_rows in rows.items():
                w.insert(table, table_rows)
    return {"step": step, "checkpoint": new, "loss": stats["loss"], "nll_loss": stats["nll_loss"]}
