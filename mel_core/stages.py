"""The seven stages of one MEL step, as plain functions over the runtime and the store.

sample -> verify -> pair -> diagnose -> abstract -> replay -> update (DESIGN.md §1). Each reads its
inputs from the store by (run, step), writes its records with deterministic ids, and returns a small
manifest (ids and counts) — never tensors. ``tasks/`` wraps each in a Prefect task; calling them
directly runs the same step without an orchestrator (the benchmarks compare both).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import time
import uuid
from collections import defaultdict

import torch

from mel_core import config as config_mod
from mel_core import experience, library, losses, meta_experience
from mel_core.checkpoint_files import saved_update_stats
from mel_core.engines.base import SamplingParams
from mel_core.errors import InjectedFault, InjectedPermanentFault, is_transient
from mel_core.runtime import Checkpoint, Runtime, derive_seed
from mel_core.stage_names import STAGE_VERSIONS
from mel_core.store import make_id
from mel_core.tokens import encode_completions

_log = logging.getLogger("mel")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def execute(rt: Runtime, stage: str, step: int, fn, *args, cache_key: str | None = None, **kwargs):
    """Run one stage body and record the execution in `stage_runs` (one row per execution)."""
    row_id = uuid.uuid4().hex
    started = _now()
    t0 = time.perf_counter()
    rt.store.insert("stage_runs", [{"stage_run_id": row_id, "run_id": rt.run_id, "step": step, "stage": stage,
                                    "cache_key": cache_key, "started_at": started, "status": "running"}])
    rt.store.publish()  # readers (mel runs, monitoring) see which stage is live
    try:
        _inject_fault(rt, stage, step, "before")
        out = fn(rt, *args, **kwargs)
        _inject_fault(rt, stage, step, "after")
    except BaseException as e:
        retry = "a transient failure: retried if the stage's retries allow" if is_transient(e) else "not retried"
        _log.warning("step %s %s failed (%s: %s); %s", step, stage, type(e).__name__,
                     (str(e).splitlines() or [""])[0][:300], retry)
        rt.store.update("stage_runs", "stage_run_id", [{
            "stage_run_id": row_id, "finished_at": _now(), "seconds": time.perf_counter() - t0,
            "status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}])
        rt.store.publish()
        raise
    rt.store.update("stage_runs", "stage_run_id", [{
        "stage_run_id": row_id, "finished_at": _now(), "seconds": time.perf_counter() - t0, "status": "completed"}])
    rt.store.publish()  # readers see the state as of the last committed stage
    return out


def _inject_fault(rt: Runtime, stage: str, step: int, when: str) -> None:
    """Fail as `orchestration.faults` asks; counted from stage_runs, so it holds across processes."""
    for f in rt.cfg.orchestration.faults:
        if (f.stage, f.step, f.when) != (stage, step, when):
            continue
        failed = rt.store.query("SELECT count(*) AS n FROM stage_runs WHERE run_id = ? AND step = ? AND stage = ? "
                                "AND error LIKE 'Injected%'", [rt.run_id, step, stage])[0]["n"]
        if f.kind == "kill":  # no exception, no bookkeeping: the process (group) is gone, as on a pre-emption
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if failed < f.times:
            cls = InjectedFault if f.kind == "transient" else InjectedPermanentFault
            raise cls(f"injected {f.kind} fault in {stage} at step {step} ({when} its body), #{failed + 1}")


def _metrics(rt: Runtime, step: int, values: dict) -> list[dict]:
    return [{"run_id": rt.run_id, "step": step, "name": k, "value": float(v)} for k, v in values.items()]


# ------------------------------------------------------------------------------------ 0. runs


def base_checkpoint_key(rt: Runtime) -> str:
    cfg = rt.cfg
    if cfg.model.name_or_path == "tiny":
        from mel_core import tiny
        return f"warm_start-v{STAGE_VERSIONS['warm_start']}-{tiny.warm_start_key(cfg)}-{rt.run_id}-{rt.epoch}"
    return f"base-{cfg.model.name_or_path}-{rt.run_id}-{rt.epoch}"


def base_checkpoint(rt: Runtime) -> Checkpoint:
    """Version 0 of the policy: the warm-started tiny model (built once, cached on disk) or a real model."""
    cfg = rt.cfg
    if cfg.model.name_or_path == "tiny":
        from mel_core import tiny
        path = tiny.ensure_warm_start(cfg)
        return Checkpoint(make_id("ckpt", "tiny", tiny.warm_start_key(cfg)), str(path))
    return Checkpoint(make_id("ckpt", "base", cfg.model.name_or_path), cfg.model.name_or_path)


def register_run(rt: Runtime, base: Checkpoint) -> None:
    """At the start of a campaign process: the run row and its version-0 checkpoint (the base or
    warm-started model), and earlier executions left 'running' by a process that died marked 'interrupted'
    (one campaign process writes a run at a time: the deployment's concurrency limit is 1)."""
    import json

    from mel_core.config import to_dict

    with rt.store.transaction() as w:
        w.insert("runs", [{"run_id": rt.run_id, "name": rt.cfg.run.name, "config_hash": rt.config_hash,
                           "config_json": json.dumps(to_dict(rt.cfg), sort_keys=True), "created_at": _now()}])
        w.insert("checkpoints", [{"checkpoint_id": base.checkpoint_id, "run_id": rt.run_id, "step": 0,
                                  "path": base.path, "parent_checkpoint_id": None, "created_at": _now()}])
        w.execute("UPDATE stage_runs SET status = 'interrupted', error = 'its process ended before the stage did' "
                  "WHERE run_id = ? AND status = 'running'", [rt.run_id])
    rt.store.publish()


# ---------------------------------------------------------------------------------- 1. sample


def sample(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """B prompts x G rollouts from pi_old at the rollout temperature, in one engine call."""
    cfg = rt.cfg
    rt.ensure_version(ckpt)
    problems = rt.step_problems(step)
    prompt_rows = []
    for pos, prob in enumerate(problems):
        prompt_rows.append({"prompt_id": make_id("prompt", rt.run_id, step, pos, prob.problem_id), "run_id": rt.run_id,
                            "step": step, "position": pos, "problem_id": prob.problem_id, "question": prob.question,
                            "answer": prob.answer, "prompt_text": rt.model_input(rt.prompts.render_solve(prob.question))})
    seed = derive_seed(cfg.run.seed, step, "sample")
    params = SamplingParams(n=cfg.sampling.group_size, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                            max_new_tokens=cfg.sampling.max_new_tokens, seed=seed)
    groups = rt.engine.generate([r["prompt_text"] for r in prompt_rows], params, desc=f"sample step {step}")
    rollout_rows = []
    for pr, completions in zip(prompt_rows, groups):
        for i, c in enumerate(completions):
            rollout_rows.append({
                "rollout_id": make_id("rollout", pr["prompt_id"], i, ckpt.checkpoint_id), "prompt_id": pr["prompt_id"],
                "run_id": rt.run_id, "step": step, "sample_index": i, "policy_version_id": ckpt.checkpoint_id,
                "text": c.text, "token_ids": c.token_ids, "num_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason})
    with rt.store.transaction() as w:
        w.insert("steps", [{"step_id": make_id("step", rt.run_id, step), "run_id": rt.run_id, "step": step,
                            "policy_version_id": ckpt.checkpoint_id, "seed": seed}])
        w.insert("prompts", prompt_rows)
        w.insert("rollouts", rollout_rows)
    return {"step": step, "prompts": len(prompt_rows), "rollouts": len(rollout_rows),
            "tokens": sum(r["num_tokens"] for r in rollout_rows)}


# ---------------------------------------------------------------------------------- 2. verify


def verify(rt: Runtime, step: int) -> dict:
    """Binary reward per rollout; unparsable output scores 0 with its reason, never a crash."""
    rows = rt.store.query(
        "SELECT r.rollout_id, r.prompt_id, r.text, r.finish_reason, p.answer FROM rollouts r JOIN prompts p "
        "USING (prompt_id) WHERE r.run_id = ? AND r.step = ? ORDER BY r.rollout_id", [rt.run_id, step])
    verdicts = rt.verifier.verify([r["text"] for r in rows], [r["answer"] for r in rows],
                                  [r["finish_reason"] for r in rows])
    updates = [{"rollout_id": r["rollout_id"], "reward": v.reward, "extracted_answer": v.extracted,
                "verify_reason": v.reason} for r, v in zip(rows, verdicts)]
    reward_mean = sum(v.reward for v in verdicts) / max(len(verdicts), 1)
    groups: dict[str, list[float]] = defaultdict(list)
    for r, v in zip(rows, verdicts):
        groups[r["prompt_id"]].append(v.reward)
    # Logged here, not in pair, so a GRPO-only run (no pair stage) reports them too: only mixed groups
    # carry a learning signal under group-normalised advantages.
    mixed = sum(experience.is_mixed(g) for g in groups.values())
    with rt.store.transaction() as w:
        w.update("rollouts", "rollout_id", updates)
        w.insert("metrics", _metrics(rt, step, {"reward_mean": reward_mean, "mixed_groups": mixed, "groups": len(groups)}))
    return {"step": step, "verified": len(rows), "reward_mean": reward_mean, "mixed_groups": mixed}


# ------------------------------------------------------------------------------------ 3. pair


def _groups(rt: Runtime, step: int) -> dict[str, list[tuple[str, float]]]:
    rows = rt.store.query("SELECT prompt_id, rollout_id, reward FROM rollouts WHERE run_id = ? AND step = ? "
                          "ORDER BY prompt_id, sample_index", [rt.run_id, step])
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in rows:
        if r["reward"] is None:
            raise RuntimeError(f"step {step}: rollout {r['rollout_id']} has no reward; run verify first")
        groups[r["prompt_id"]].append((r["rollout_id"], r["reward"]))
    return groups


def pair(rt: Runtime, step: int) -> dict:
    """Contrastive pairs from mixed groups only."""
    groups = _groups(rt, step)
    pairs = experience.make_pairs(groups, rt.cfg.experience.pairs_per_group, derive_seed(rt.cfg.run.seed, step, "pair"),
                                  strategy=rt.cfg.experience.pairing)
    rows = [{"pair_id": make_id("pair", p.prompt_id, p.correct_rollout_id, p.incorrect_rollout_id), "run_id": rt.run_id,
             "step": step, "prompt_id": p.prompt_id, "correct_rollout_id": p.correct_rollout_id,
             "incorrect_rollout_id": p.incorrect_rollout_id} for p in pairs]
    with rt.store.transaction() as w:
        w.insert("pairs", rows)
        w.insert("metrics", _metrics(rt, step, {"pairs": len(rows)}))
    return {"step": step, "pairs": len(rows)}


# -------------------------------------------------------------------------------- 4. diagnose


def _pair_rows(rt: Runtime, step: int, where: str = "") -> list[dict]:
    """The step's pairs with question, gold answer and both solutions (and their analysis, if any)."""
    return rt.store.query(
        "SELECT pa.pair_id, pr.question, pr.answer, ri.text AS incorrect, rc.text AS correct, a.analysis_id, "
        "a.raw_text FROM pairs pa JOIN prompts pr USING (prompt_id) "
        "JOIN rollouts ri ON ri.rollout_id = pa.incorrect_rollout_id "
        "JOIN rollouts rc ON rc.rollout_id = pa.correct_rollout_id LEFT JOIN analyses a ON a.pair_id = pa.pair_id "
        f"WHERE pa.run_id = ? AND pa.step = ? {where} ORDER BY pa.pair_id", [rt.run_id, step])


def _analysis_params(rt: Runtime, step: int, stage: str) -> SamplingParams:
    cfg = rt.cfg
    return SamplingParams(n=1, temperature=cfg.experience.analysis_temperature,
                          max_new_tokens=cfg.experience.analysis_max_new_tokens,
                          seed=derive_seed(cfg.run.seed, step, stage))


def diagnose(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """The policy reads [question, incorrect, correct] and writes s* and C — one batched call.

    single_pass: the same generation goes on to the heuristics, which `abstract` parses. two_pass: the
    diagnosis part alone is kept (and is the NLL target), and `abstract` asks for H in a second call.
    """
    rows = _pair_rows(rt, step)
    if not rows:
        return {"step": step, "analyses": 0, "diagnosed": 0}
    rt.ensure_version(ckpt)
    two_pass = rt.cfg.experience.analysis_mode == "two_pass"
    render = rt.prompts.render_diagnose if two_pass else rt.prompts.render_analysis
    prompts = [rt.model_input(render(r["question"], r["incorrect"], r["correct"])) for r in rows]
    outs = rt.engine.generate(prompts, _analysis_params(rt, step, "diagnose"), desc=f"diagnose step {step}")
    analysis_rows = []
    for r, prompt, (c,) in zip(rows, prompts, outs):
        parsed = meta_experience.parse_diagnosis(c.text)
        token_ids = c.token_ids
        if two_pass:
            kept = meta_experience.diagnosis_part(c.text)
            if kept != c.text.strip():  # heuristics written unasked are cut: re-encode what is kept
                token_ids = encode_completions(rt.policy.tokenizer, [kept])[0]
        analysis_rows.append({
            "analysis_id": make_id("analysis", r["pair_id"], ckpt.checkpoint_id), "pair_id": r["pair_id"],
            "run_id": rt.run_id, "step": step, "policy_version_id": ckpt.checkpoint_id, "prompt_text": prompt,
            "raw_text": c.text, "token_ids": token_ids, "num_tokens": len(token_ids),
            "bifurcation_step": parsed.bifurcation_step, "critique": parsed.critique, "parsed": parsed.ok,
            "status": "diagnosed" if parsed.ok else "rejected", "reject_reason": parsed.reject_reason,
            "mode": rt.cfg.experience.analysis_mode})
    diagnosed = sum(r["parsed"] for r in analysis_rows)
    with rt.store.transaction() as w:
        w.insert("analyses", analysis_rows)
        w.insert("metrics", _metrics(rt, step, {"analyses": len(analysis_rows), "diagnosed": diagnosed}))
    return {"step": step, "analyses": len(analysis_rows), "diagnosed": diagnosed}


# -------------------------------------------------------------------------------- 5. abstract


def abstract(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """Subject heuristics H (If/Then, no problem numbers) for each diagnosed analysis.

    single_pass parses them from the diagnose generation; two_pass generates them in one batched call
    conditioned on the question, both solutions and the diagnosis (s*, C).
    """
    rows = _pair_rows(rt, step, "AND a.status IN ('diagnosed', 'candidate')")
    texts = [r["raw_text"] for r in rows]
    abstract_rows = [{} for _ in rows]
    if rows and rt.cfg.experience.analysis_mode == "two_pass":
        rt.ensure_version(ckpt)
        prompts = [rt.model_input(rt.prompts.render_abstract(r["question"], r["incorrect"], r["correct"],
                                                             meta_experience.diagnosis_part(r["raw_text"])))
                   for r in rows]
        outs = rt.engine.generate(prompts, _analysis_params(rt, step, "abstract"), desc=f"abstract step {step}")
        texts = [c.text for (c,) in outs]
        abstract_rows = [{"abstract_prompt_text": p, "abstract_text": c.text, "abstract_token_ids": c.token_ids}
                         for p, (c,) in zip(prompts, outs)]
    heuristic_rows, status_rows = [], []
    for r, text, extra in zip(rows, texts, abstract_rows):
        parsed = meta_experience.parse_heuristics(text, gold_answer=r["answer"], question=r["question"],
                                                  max_heuristics=rt.cfg.experience.max_heuristics)
        rules, reason = parsed.heuristics, parsed.reject_reason
        status_rows.append({"analysis_id": r["analysis_id"], "status": "candidate" if rules else "rejected",
                            "parsed": bool(rules), "reject_reason": reason, **extra})
        heuristic_rows += [{"heuristic_id": make_id("heuristic", r["analysis_id"], i), "analysis_id": r["analysis_id"],
                            "run_id": rt.run_id, "step": step, "position": i, "text": h} for i, h in enumerate(rules)]
    candidates = sum(1 for s in status_rows if s["status"] == "candidate")
    with rt.store.transaction() as w:
        w.update("analyses", "analysis_id", status_rows)
        w.insert("heuristics", heuristic_rows)
        # Near-duplicates join the run's heuristic library as soon as their text exists (mel_core.library).
        library.assign_clusters(w, rt.run_id, rt.cfg.library.similarity_threshold)
        w.insert("metrics", _metrics(rt, step, {"candidates": candidates}))
    return {"step": step, "candidates": candidates, "heuristics": len(heuristic_rows)}


# ---------------------------------------------------------------------------------- 6. replay


def replay(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """Re-solve each question with its M in context (one batched call); accept M if replays verify."""
    cfg = rt.cfg.experience
    rows = rt.store.query(
        "SELECT a.analysis_id, pr.question, pr.answer, list(h.text ORDER BY h.position) AS heuristics "
        "FROM analyses a JOIN pairs pa USING (pair_id) JOIN prompts pr ON pr.prompt_id = pa.prompt_id "
        "JOIN heuristics h ON h.analysis_id = a.analysis_id WHERE a.run_id = ? AND a.step = ? "
        "AND (a.status IN ('candidate', 'accepted') OR a.reject_reason = 'replay_failed') "
        "GROUP BY ALL ORDER BY a.analysis_id", [rt.run_id, step])
    rows = [r for r in rows if r["heuristics"]]
    if not rows:
        with rt.store.transaction() as w:
            w.insert("metrics", _metrics(rt, step, {"accepted": 0}))  # retention of 0/0 is undefined: not logged
        return {"step": step, "candidates": 0, "accepted": 0, "retention_ratio": None}
    rt.ensure_version(ckpt)
    prompts = [rt.model_input(rt.prompts.render_validation(r["question"],
                                                           meta_experience.render_heuristics(r["heuristics"])))
               for r in rows]
    params = SamplingParams(n=cfg.replays_per_experience, temperature=cfg.replay_temperature,
                            max_new_tokens=rt.cfg.sampling.max_new_tokens, seed=derive_seed(rt.cfg.run.seed, step, "replay"))
    outs = rt.engine.generate(prompts, params, desc=f"replay step {step}")
    flat = [(r, p, i, c) for r, p, cs in zip(rows, prompts, outs) for i, c in enumerate(cs)]
    verdicts = rt.verifier.verify([c.text for *_, c in flat], [r["answer"] for r, *_ in flat],
                                  [c.finish_reason for *_, c in flat])
    replay_rows, rewards = [], defaultdict(list)
    for (r, p, i, c), v in zip(flat, verdicts):
        rewards[r["analysis_id"]].append(v.reward)
        replay_rows.append({"replay_id": make_id("replay", r["analysis_id"], i), "analysis_id": r["analysis_id"],
                            "run_id": rt.run_id, "step": step, "replay_index": i, "prompt_text": p, "text": c.text,
                            "reward": v.reward, "verify_reason": v.reason})
    status_rows = []
    for r in rows:
        ok = experience.accept(rewards[r["analysis_id"]], cfg.accept_min_correct)
        status_rows.append({"analysis_id": r["analysis_id"], "status": "accepted" if ok else "rejected",
                            "reject_reason": None if ok else "replay_failed"})
    accepted = sum(1 for s in status_rows if s["status"] == "accepted")
    ratio = experience.retention_ratio(accepted, len(rows))
    with rt.store.transaction() as w:
        w.insert("replays", replay_rows)
        w.update("analyses", "analysis_id", status_rows)
        w.execute("UPDATE heuristics SET accepted = (a.status = 'accepted') FROM analyses a "
                  "WHERE heuristics.analysis_id = a.analysis_id AND heuristics.run_id = ? AND heuristics.step = ?",
                  [rt.run_id, step])
        w.insert("metrics", _metrics(rt, step, {"accepted": accepted, "retention_ratio": ratio}))
    return {"step": step, "candidates": len(rows), "accepted": accepted, "retention_ratio": ratio}


# ---------------------------------------------------------------------------------- 7. update


def _distributed_update(rt: Runtime, ckpt: Checkpoint, new: Checkpoint, rl, nll) -> dict:
    """The step on optim.fsdp_processes torchrun processes (mel_core/distributed.py); the flow's own policy
    then loads the checkpoint they wrote, to generate from it."""
    from mel_core import distributed
    from mel_core.files import write_dir_atomically

    write_dir_atomically(new.path, lambda tmp: distributed.launch(config_mod.to_dict(rt.cfg), ckpt.path, rl, nll, tmp,
                                                              rt.cfg.optim.fsdp_processes))
    rt.ensure_version(new)
    return saved_update_stats(new.path)  # written beside the weights by rank 0


def update(rt: Runtime, step: int, ckpt: Checkpoint) -> dict:
    """One optimizer step on L_RL + lambda * L_NLL; the checkpoint, the update row and the
    "internalized" links commit together after the checkpoint directory is in place."""
    from mel_core.policy import NLLBatch, RLBatch

    cfg = rt.cfg
    rollouts = rt.store.query(
        "SELECT r.rollout_id, r.prompt_id, r.token_ids, r.reward, p.prompt_text FROM rollouts r "
        "JOIN prompts p USING (prompt_id) WHERE r.run_id = ? AND r.step = ? ORDER BY p.position, r.sample_index",
        [rt.run_id, step])
    if any(r["reward"] is None for r in rollouts):
        raise RuntimeError(f"step {step}: unverified rollouts; run verify first")
    group_index = {pid: i for i, pid in enumerate(dict.fromkeys(r["prompt_id"] for r in rollouts))}
    rewards = torch.tensor([r["reward"] for r in rollouts], dtype=torch.float32)  # [B*G]
    group_ids = torch.tensor([group_index[r["prompt_id"]] for r in rollouts])  # [B*G]
    advantages = losses.ADVANTAGES[cfg.loss.advantage](rewards, group_ids)  # [B*G]
    rl = RLBatch(prompts=[r["prompt_text"] for r in rollouts], completion_ids=[r["token_ids"] for r in rollouts],
                 advantages=advantages)
    accepted = []
    if cfg.experience.enabled and cfg.loss.nll_coef > 0:
        accepted = rt.store.query(
            "SELECT analysis_id, prompt_text, token_ids, abstract_prompt_text, abstract_token_ids FROM analyses "
            "WHERE run_id = ? AND step = ? AND status = 'accepted' ORDER BY analysis_id", [rt.run_id, step])
    # M given its retrospective context; in two_pass M spans two generations, each learned given its own prompt.
    targets = [(a["prompt_text"], a["token_ids"]) for a in accepted]
    targets += [(a["abstract_prompt_text"], a["abstract_token_ids"]) for a in accepted if a["abstract_token_ids"]]
    nll = NLLBatch(prompts=[p for p, _ in targets], target_ids=[t for _, t in targets])

    new = Checkpoint(make_id("ckpt", rt.run_id, step, ckpt.checkpoint_id), str(rt.checkpoint_dir / f"step-{step:05d}"))
    stats = saved_update_stats(new.path)
    if stats is not None:
        # A process died after the checkpoint's rename and before the commit below. The checkpoint is
        # whole (renamed into place): serve it and record its stats, rather than train again and trust
        # the step to reproduce the same weights (non-deterministic GPU kernels would not).
        rt.ensure_version(new)
    else:
        rt.ensure_version(ckpt)
        if cfg.optim.fsdp_processes > 1:
            stats = _distributed_update(rt, ckpt, new, rl, nll)
        else:
            try:
                stats = rt.policy.train_step(rl, nll)
                rt.policy.save_checkpoint(new.path, update_stats=stats)
            except BaseException:
                # The weights may have moved before the failure (a refused step, a failed save): the next use of
                # this process's policy, e.g. the retry, must reload `ckpt` instead of training on from them.
                rt.forget_version()
                raise
            rt.trained_to(new)  # the HF engine's module holds the new weights already; vLLM reloads them
    update_id = make_id("update", rt.run_id, step, ckpt.checkpoint_id)
    heuristic_ids = rt.store.query(
        "SELECT h.heuristic_id, h.analysis_id FROM heuristics h JOIN analyses a USING (analysis_id) "
        "WHERE a.run_id = ? AND a.step = ? AND a.status = 'accepted'", [rt.run_id, step]) if accepted else []
    if not stats["num_nll_sequences"]:
        stats["nll_loss"] = None  # the NLL of no sequences is undefined, not zero: NULL, and no metric
    with rt.store.transaction() as w:
        w.insert("checkpoints", [{"checkpoint_id": new.checkpoint_id, "run_id": rt.run_id, "step": step,
                                  "path": new.path, "parent_checkpoint_id": ckpt.checkpoint_id, "created_at": _now()}])
        w.insert("updates", [{"update_id": update_id, "run_id": rt.run_id, "step": step,
                              "checkpoint_in": ckpt.checkpoint_id, "checkpoint_out": new.checkpoint_id,
                              **{k: stats[k] for k in ("loss", "rl_loss", "nll_loss", "grad_norm", "num_sequences",
                                                       "num_nll_sequences")}}])
        w.insert("internalized", [{"update_id": update_id, "analysis_id": h["analysis_id"],
                                   "heuristic_id": h["heuristic_id"]} for h in heuristic_ids])
        w.insert("metrics", _metrics(rt, step, {k: v for k, v in stats.items() if isinstance(v, (int, float))}))
    return {"step": step, **new.as_dict(), "loss": stats["loss"], "nll_loss": stats["nll_loss"]}
