"""The stages' records: named reads of what a stage needs from the store, and the rows a stage writes.

Every SQL a stage runs lives here, under a name that says what it reads, so ``mel_core.stages`` reads as
load -> compute -> write. Rows carry deterministic ids (``store.make_id``) from their content and position,
so writing one twice is a no-op (the store's ``INSERT OR IGNORE``).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from mel_core.store import make_id


def now() -> dt.datetime:
    """A naive UTC timestamp, as every TIMESTAMP column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def metric_rows(run_id: str, step: int, values: dict) -> list[dict]:
    return [{"run_id": run_id, "step": step, "name": k, "value": float(v)} for k, v in values.items()]


# ------------------------------------------------------------------------------------- verify, pair


def rollouts_to_verify(store, run_id: str, step: int) -> list[dict]:
    """Every rollout of the step with its gold answer and how its generation ended."""
    return store.query(
        "SELECT r.rollout_id, r.prompt_id, r.text, r.finish_reason, p.answer FROM rollouts r JOIN prompts p "
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


# ------------------------------------------------------------------------------- diagnose, abstract


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


# ------------------------------------------------------------------------------------------- replay


def analyses_to_replay(store, run_id: str, step: int) -> list[dict]:
    """The analyses that reached the replay: candidates, and — when replay runs again after a crash
    mid-stage — those it had already decided (accepted, or rejected as replay_failed). Deciding those again
    is idempotent: the same seed replays the same completions, the same verdicts and the same rows."""
    return store.query(
        "SELECT a.analysis_id, pr.prompt_id, pr.question, pr.answer, a.replay_text, "
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


# ------------------------------------------------------------------------------------------- update


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
    """The accepted meta-experiences of the step: each trained text's context, token ids and parts."""
    return store.query(
        "SELECT analysis_id, prompt_text, trained_token_ids, trained_parts, abstract_prompt_text, "
        "abstract_trained_token_ids, abstract_trained_parts FROM analyses "
        "WHERE run_id = ? AND step = ? AND status = 'accepted' ORDER BY analysis_id", [run_id, step])


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


def update_records(run_id: str, step: int, checkpoint_in: str, checkpoint_out: str, path: str, stats: dict,
                   heuristics: list[dict]) -> dict[str, list[dict]]:
    """The rows an update commits together: the new checkpoint, the update, and what it internalized."""
    update_id = make_id("update", run_id, step, checkpoint_in)
    return {
        "checkpoints": [{"checkpoint_id": checkpoint_out, "run_id": run_id, "step": step, "path": path,
                         "parent_checkpoint_id": checkpoint_in, "created_at": now()}],
        "updates": [{"update_id": update_id, "run_id": run_id, "step": step, "checkpoint_in": checkpoint_in,
                     "checkpoint_out": checkpoint_out,
                     **{k: stats.get(k) for k in ("loss", "rl_loss", "nll_loss", "grad_norm", "num_sequences",
                                                  "num_nll_sequences")}}],
        "internalized": [{"update_id": update_id, "analysis_id": h["analysis_id"], "heuristic_id": h["heuristic_id"]}
                         for h in heuristics],
        "metrics": metric_rows(run_id, step, {k: v for k, v in stats.items() if isinstance(v, (int, float))}),
    }


# --------------------------------------------------------------------- reads for the app and the UI


def latest_accepted_heuristic(store, run_id: str) -> str | None:
    """The id of an accepted heuristic of the run's latest step that has one (what `mel run` suggests to trace)."""
    rows = store.query("SELECT heuristic_id FROM heuristics WHERE run_id = ? AND accepted ORDER BY step DESC, "
                       "heuristic_id LIMIT 1", [run_id])
    return rows[0]["heuristic_id"] if rows else None


def accepted_heuristics_of_step(store, run_id: str, step: int) -> list[dict]:
    return store.query("SELECT heuristic_id, text, analysis_id FROM heuristics WHERE run_id = ? AND step = ? AND accepted "
                       "ORDER BY heuristic_id", [run_id, step])


def heuristic_lineage(store, heuristic_id: str) -> dict | None:
    """Where a heuristic came from and which checkpoint learned it (the heuristic_lineage view)."""
    rows = store.query("SELECT * FROM heuristic_lineage WHERE heuristic_id = ?", [heuristic_id])
    return rows[0] if rows else None


def checkpoint(store, checkpoint_id: str) -> dict | None:
    rows = store.query("SELECT * FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id])
    return rows[0] if rows else None


def checkpoint_heuristics(store, checkpoint_id: str) -> list[dict]:
    """Every heuristic the checkpoint internalized (the checkpoint_heuristics view)."""
    return store.query("SELECT * FROM checkpoint_heuristics WHERE checkpoint_id = ? ORDER BY heuristic_step, "
                       "heuristic_id", [checkpoint_id])


def find_checkpoint(store, id_or_path: str, path: str) -> dict | None:
    """A checkpoint by id or by directory, with its run's config (to evaluate it with the run's own settings)."""
    rows = store.query("SELECT c.checkpoint_id, c.path, c.step, c.run_id, r.config_json FROM checkpoints c "
                       "LEFT JOIN runs r USING (run_id) WHERE c.checkpoint_id = ? OR c.path = ? ORDER BY c.step LIMIT 1",
                       [id_or_path, path])
    return rows[0] if rows else None


def evaluation_results(store, run_id: str, checkpoint_id: str, datasets: list[str]) -> list[dict]:
    return store.query("SELECT dataset, metric, k, temperature, value, num_problems, seconds FROM evals WHERE run_id = ? "
                       "AND checkpoint_id = ? AND list_contains(?, dataset) ORDER BY dataset, temperature, metric",
                       [run_id, checkpoint_id, datasets])
