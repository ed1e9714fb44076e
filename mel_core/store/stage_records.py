"""What the stages read from the store and the rows they write, under names that say what each read is.

Each stage reads as load -> compute -> write (mel_core.step.stages); its SQL lives here. Rows carry deterministic
ids from their content and position, so writing one twice is a no-op (the writer's ``INSERT OR IGNORE``).
"""

from __future__ import annotations

import json
from collections import defaultdict

from mel_core.ids import make_id, now


def metric_rows(run_id: str, step: int, values: dict) -> list[dict]:
    return [{"run_id": run_id, "step": step, "name": k, "value": float(v)} for k, v in values.items()]



def rollouts_to_verify(store, run_id: str, step: int) -> list[dict]:
    """Every rollout of the step with its gold answer, how its generation ended and its problem (what a reward
    plug-in is given)."""
    return store.query(
        "SELECT r.rollout_id, r.prompt_id, r.text, r.finish_reason, p.answer, p.problem_id, p.question, p.row_json "
        "FROM rollouts r JOIN prompts p "
        "USING (prompt_id) WHERE r.run_id = ? AND r.step = ? ORDER BY r.rollout_id", [run_id, step])



def reward_groups(store, run_id: str, step: int) -> dict[str, list[tuple[str, float]]]:
    """prompt_id -> [(rollout_id, reward)] in sample order; an unverified rollout is an error."""
    rows = store.query("SELECT prompt_id, rollout_id, reward FROM rollouts WHERE run_id = ? AND step = ? "
                       "ORDER BY prompt_id, sample_index", [run_id, step])
    groups: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in rows:
        if r["reward"] is None:
            raise RuntimeError(f"step {step}: rollout {r['rollout_id']} has no reward; run verify first")
        groups[r["prompt_id"]].append((r["rollout_id"], r["reward"]))
    return groups



def pairs_with_texts(store, run_id: str, step: int, analysis_status: tuple[str, ...] | None = None) -> list[dict]:
    """The step's pairs with question, gold answer, both solutions and their analysis (if any); with
    `analysis_status`, only pairs whose analysis has one of those statuses."""
    where, params = "", [run_id, step]
    if analysis_status is not None:
        where = f"AND a.status IN ({', '.join('?' * len(analysis_status))})"
        params += list(analysis_status)
    return store.query(
        "SELECT pa.pair_id, pr.question, pr.answer, ri.text AS incorrect, rc.text AS correct, a.analysis_id, "
        "a.raw_text, a.finish_reason FROM pairs pa JOIN prompts pr USING (prompt_id) "
        "JOIN rollouts ri ON ri.rollout_id = pa.incorrect_rollout_id "
        "JOIN rollouts rc ON rc.rollout_id = pa.correct_rollout_id LEFT JOIN analyses a ON a.pair_id = pa.pair_id "
        f"WHERE pa.run_id = ? AND pa.step = ? {where} ORDER BY pa.pair_id", params)



def analyses_to_replay(store, run_id: str, step: int) -> list[dict]:
    """The analyses that reached the replay: candidates, and — when replay runs again after a crash
    mid-stage — those it had already decided (accepted, or rejected as replay_failed). Deciding those again
    is idempotent: the same seed replays the same completions, the same verdicts and the same rows."""
    return store.query(
        "SELECT a.analysis_id, pr.prompt_id, pr.question, pr.answer, pr.problem_id, pr.row_json, a.replay_text, "
        "list(h.text ORDER BY h.position) AS heuristics, list(DISTINCT h.cluster_id) AS clusters "
        "FROM analyses a JOIN pairs pa USING (pair_id) JOIN prompts pr ON pr.prompt_id = pa.prompt_id "
        "JOIN heuristics h ON h.analysis_id = a.analysis_id WHERE a.run_id = ? AND a.step = ? "
        "AND (a.status IN ('candidate', 'accepted') OR a.reject_reason = 'replay_failed') "
        "GROUP BY ALL ORDER BY a.analysis_id", [run_id, step])



def prompt_reward_means(store, run_id: str, step: int) -> dict[str, float]:
    """prompt_id -> the mean reward of its rollouts at this step (how often the policy solves it unaided)."""
    rows = store.query("SELECT prompt_id, avg(reward) AS mean FROM rollouts WHERE run_id = ? AND step = ? "
                       "GROUP BY prompt_id", [run_id, step])
    return {r["prompt_id"]: r["mean"] for r in rows}



def mark_replayed(w, run_id: str, step: int) -> None:
    """Each heuristic of the step takes its analysis's verdict (accepted or not)."""
    w.execute("UPDATE heuristics SET accepted = (a.status = 'accepted') FROM analyses a "
              "WHERE heuristics.analysis_id = a.analysis_id AND heuristics.run_id = ? AND heuristics.step = ?",
              [run_id, step])



def rollouts_to_train(store, run_id: str, step: int) -> list[dict]:
    """The step's rollouts in (prompt position, sample) order with their prompt text and reward."""
    rows = store.query(
        "SELECT r.rollout_id, r.prompt_id, r.token_ids, r.reward, p.prompt_text FROM rollouts r "
        "JOIN prompts p USING (prompt_id) WHERE r.run_id = ? AND r.step = ? ORDER BY p.position, r.sample_index",
        [run_id, step])
    if any(r["reward"] is None for r in rows):
        raise RuntimeError(f"step {step}: unverified rollouts; run verify first")
    return rows



def accepted_targets(store, run_id: str, step: int) -> list[dict]:
    """The accepted meta-experiences of the step: each trained text's context, text, token ids and parts, and the
    pair's two solutions (what a critique may quote)."""
    return store.query(
        "SELECT a.analysis_id, a.prompt_text, a.trained_text, a.trained_token_ids, a.trained_parts, "
        "a.abstract_prompt_text, a.abstract_trained_text, a.abstract_trained_token_ids, a.abstract_trained_parts, "
        "ri.text AS incorrect, rc.text AS correct FROM analyses a JOIN pairs pa USING (pair_id) "
        "JOIN rollouts ri ON ri.rollout_id = pa.incorrect_rollout_id "
        "JOIN rollouts rc ON rc.rollout_id = pa.correct_rollout_id "
        "WHERE a.run_id = ? AND a.step = ? AND a.status = 'accepted' ORDER BY a.analysis_id", [run_id, step])



def accepted_replays(store, run_id: str, step: int) -> list[dict]:
    """For each accepted analysis of the step that has one, its first verified replay (lowest replay_index among
    its own replays with reward > 0) and the plain solve prompt of its problem (mel-distill trains on these)."""
    return store.query(
        "SELECT a.analysis_id, p.prompt_text, rp.replay_id, rp.text, rp.token_ids, rp.finish_reason "
        "FROM analyses a JOIN replays rp ON rp.analysis_id = a.analysis_id AND rp.kind = 'self' AND rp.reward > 0 "
        "JOIN pairs pa ON pa.pair_id = a.pair_id JOIN prompts p ON p.prompt_id = pa.prompt_id "
        "WHERE a.run_id = ? AND a.step = ? AND a.status = 'accepted' "
        "QUALIFY row_number() OVER (PARTITION BY a.analysis_id ORDER BY rp.replay_index) = 1 "
        "ORDER BY a.analysis_id", [run_id, step])



def unsolved_problems(store, run_id: str, step: int) -> list[dict]:
    """The step's problems that not every rollout solved, the least solved first (ties in prompt position), each
    with its question and solve prompt (grpo+gold trains on the world's solution of these)."""
    return store.query(
        "SELECT p.prompt_id, p.question, p.prompt_text, avg(r.reward) AS solved FROM prompts p "
        "JOIN rollouts r USING (prompt_id) WHERE r.run_id = ? AND r.step = ? GROUP BY p.prompt_id, p.question, "
        "p.prompt_text, p.position HAVING avg(r.reward) < 1 ORDER BY solved, p.position", [run_id, step])


def paired_correct_rollouts(store, run_id: str, step: int, limit: int) -> list[dict]:
    """The first `limit` distinct correct rollouts of the step's pairs, in pair-id order (a hash: no position or
    reward order), each with its solve prompt (the count-matched grpo+sft trains on these)."""
    return store.query(
        "SELECT rollout_id, prompt_text, token_ids FROM (SELECT r.rollout_id, p.prompt_text, r.token_ids, "
        "min(pa.pair_id) AS first_pair FROM pairs pa JOIN rollouts r ON r.rollout_id = pa.correct_rollout_id "
        "JOIN prompts p ON p.prompt_id = pa.prompt_id WHERE pa.run_id = ? AND pa.step = ? GROUP BY ALL) "
        "ORDER BY first_pair LIMIT ?", [run_id, step, limit])



def accepted_count(store, run_id: str, step: int) -> int | None:
    """How many analyses the run accepted at the step, or None when its replay stage has not run there (no
    `accepted` metric: the run has not reached the step, or does not run MEL)."""
    rows = store.query("SELECT value FROM metrics WHERE run_id = ? AND step = ? AND name = 'accepted'",
                       [run_id, step])
    return int(rows[0]["value"]) if rows else None



def accepted_correct_rollouts(store, run_id: str, step: int) -> list[dict]:
    """For each accepted analysis of the step, its pair's correct rollout and solve prompt (the grpo+sft
    baseline trains on these instead of M*: count-matched to the acceptances)."""
    return store.query(
        "SELECT a.analysis_id, p.prompt_text, r.token_ids FROM analyses a JOIN pairs pa USING (pair_id) "
        "JOIN rollouts r ON r.rollout_id = pa.correct_rollout_id JOIN prompts p ON p.prompt_id = pa.prompt_id "
        "WHERE a.run_id = ? AND a.step = ? AND a.status = 'accepted' ORDER BY a.analysis_id", [run_id, step])



def accepted_heuristics(store, run_id: str, step: int) -> list[dict]:
    """(heuristic_id, analysis_id) of every heuristic of an accepted analysis of the step."""
    return store.query("SELECT h.heuristic_id, h.analysis_id FROM heuristics h JOIN analyses a USING (analysis_id) "
                       "WHERE a.run_id = ? AND a.step = ? AND a.status = 'accepted'", [run_id, step])



def committed_update(store, run_id: str, step: int, checkpoint_out: str) -> dict | None:
    """The loss and NLL of the step's committed update that wrote `checkpoint_out`, or None if none is committed."""
    rows = store.query("SELECT loss, nll_loss FROM updates WHERE run_id = ? AND step = ? AND checkpoint_out = ?",
                       [run_id, step, checkpoint_out])
    return rows[0] if rows else None


def checkpoint_file_rows(checkpoint_id: str, files: list) -> list[dict]:
    """The `checkpoint_files` rows of a checkpoint's files (mel_core.model.checkpoints.FileDigest)."""
    return [{"checkpoint_id": checkpoint_id, "file": f.file, "size": f.size, "digest": f.digest,
             "algorithm": f.algorithm} for f in files]


def update_records(run_id: str, step: int, checkpoint_in: str, checkpoint_out: str, path: str, stats: dict,
                   heuristics: list[dict], files: list) -> dict[str, list[dict]]:
    """The rows an update commits together: the new checkpoint and its files' digests
    (mel_core.model.checkpoints.FileDigest), the update, and what it internalized."""
    update_id = make_id("update", run_id, step, checkpoint_in)
    return {
        "checkpoints": [{"checkpoint_id": checkpoint_out, "run_id": run_id, "step": step, "path": path,
                         "parent_checkpoint_id": checkpoint_in, "created_at": now()}],
        "checkpoint_files": checkpoint_file_rows(checkpoint_out, files),
        "updates": [{"update_id": update_id, "run_id": run_id, "step": step, "checkpoint_in": checkpoint_in,
                     "checkpoint_out": checkpoint_out,
                     **{k: stats.get(k) for k in ("loss", "rl_loss", "nll_loss", "grad_norm", "num_sequences",
                                                  "num_nll_sequences")}}],
        "internalized": [{"update_id": update_id, "analysis_id": h["analysis_id"], "heuristic_id": h["heuristic_id"]}
                         for h in heuristics],
        "metrics": metric_rows(run_id, step, {k: v for k, v in stats.items() if isinstance(v, (int, float))}),
    }



def verifier_row(verifier) -> dict:
    """The `verifiers` row of a :class:`mel_core.algorithm.rewards.verifier.Verifier`: its identity (what decides its verdicts) by
    the hash every reward row it produces carries."""
    identity = verifier.identity
    return {"verifier_hash": verifier.identity_hash, "kind": identity["kind"], "extraction": identity["extraction"],
            "identity_json": json.dumps(identity, sort_keys=True), "created_at": now()}


# ------------------------------------------------------------------------------- evaluations and executions


def replace_evaluation(w, run_id: str, checkpoint_id: str, dataset: str, verifier: dict, metrics: list[dict],
                       samples: list[dict]) -> None:
    """An evaluation's rows, replacing the (run, checkpoint, dataset)'s earlier ones."""
    for table in ("evals", "eval_samples"):
        w.execute(f"DELETE FROM {table} WHERE run_id = ? AND checkpoint_id = ? AND dataset = ?",
                  [run_id, checkpoint_id, dataset])
    w.insert("verifiers", [verifier])
    w.insert("evals", metrics)
    w.insert("eval_samples", samples)


def injected_failures(store, run_id: str, step: int, stage: str) -> int:
    """How many executions of the stage at the step failed of an injected fault (orchestration.faults)."""
    return store.query("SELECT count(*) AS n FROM stage_runs WHERE run_id = ? AND step = ? AND stage = ? "
                       "AND error LIKE 'Injected%'", [run_id, step, stage])[0]["n"]


def mark_interrupted(w, run_id: str) -> None:
    """Executions a dead process left 'running' (called under the run lock, so no live process owns them)."""
    w.execute("UPDATE stage_runs SET status = 'interrupted', error = 'its process ended before the stage did' "
              "WHERE run_id = ? AND status = 'running'", [run_id])
