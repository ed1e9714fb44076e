"""The stages' records: named reads of what a stage needs from the store, and the rows a stage writes.

Every SQL a stage runs lives here, under a name that says what it reads, so ``mel_core.stages`` reads as
load -> compute -> write. Rows carry deterministic ids (``store.make_id``) from their content and position,
so writing one twice is a no-op (the store's ``INSERT OR IGNORE``).
"""

from __future__ import annotations

import datetime as dt
import json
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


def replayed_lessons(store, run_id: str) -> list[dict]:
    """Every analysis of the run that reached the replay, with its question, its pair's incorrect rollout, its
    heuristics and its verdict: what a world that knows its error types needs to judge the filter."""
    return store.query(
        "SELECT a.analysis_id, a.step, pr.question, ri.text AS incorrect, a.status = 'accepted' AS accepted, "
        "list(h.text ORDER BY h.position) AS heuristics FROM analyses a JOIN pairs pa USING (pair_id) "
        "JOIN prompts pr ON pr.prompt_id = pa.prompt_id JOIN rollouts ri ON ri.rollout_id = pa.incorrect_rollout_id "
        "JOIN heuristics h ON h.analysis_id = a.analysis_id WHERE a.run_id = ? "
        "AND (a.status = 'accepted' OR a.reject_reason IN ('replay_failed', 'transfer_failed')) "
        "GROUP BY ALL ORDER BY a.step, a.analysis_id", [run_id])


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


# ----------------------------------------------------------------------- reads for `mel export` (mel_core.export)
# Each streams Arrow record batches from a reader (StoreReader.query_batches) and puts the lineage first: the
# run, step and policy version of every row, and for analyses and heuristics the ids up the chain (pair,
# prompt, problem, both rollouts) and the update and checkpoint that internalized them (NULL when none did).

# The accepted analyses' pairs: what --accepted-only keeps of the rollouts.
_ACCEPTED_PAIR_ROLLOUTS = (
    "SELECT unnest([pa.correct_rollout_id, pa.incorrect_rollout_id]) FROM pairs pa "
    "JOIN analyses a ON a.pair_id = pa.pair_id WHERE a.status = 'accepted'")


def export_rollouts(reader, accepted_only: bool):
    """Every rollout with its prompt (text, question, gold answer) and verdict; `accepted_only`: those of the
    pairs whose analysis was accepted (the correct and the incorrect one)."""
    where = f"WHERE r.rollout_id IN ({_ACCEPTED_PAIR_ROLLOUTS})" if accepted_only else ""
    return reader.query_batches(
        "SELECT r.run_id, r.step, r.policy_version_id, r.rollout_id, r.prompt_id, p.problem_id, r.sample_index, "
        "p.question, p.answer, p.prompt_text, r.text, r.token_ids, r.num_tokens, r.finish_reason, r.reward, "
        "r.extracted_answer, r.verify_reason FROM rollouts r LEFT JOIN prompts p ON p.prompt_id = r.prompt_id "
        f"{where} ORDER BY r.run_id, r.step, p.position, r.sample_index, r.rollout_id")


# One update (and its checkpoint) per analysis or heuristic: a step's update internalizes its own step's
# acceptances once; min() keeps one row should a store ever hold two.
_INTERNALIZED_BY = (
    "LEFT JOIN (SELECT {key}, min(update_id) AS update_id FROM internalized GROUP BY {key}) i "
    "ON i.{key} = {alias}.{key} LEFT JOIN updates u ON u.update_id = i.update_id")


def export_analyses(reader, accepted_only: bool):
    """Every analysis (all its columns: the generation, M*, its token ids and parts, status and reason) after its
    lineage; `accepted_only`: status 'accepted'."""
    where = "WHERE a.status = 'accepted'" if accepted_only else ""
    return reader.query_batches(
        "SELECT a.run_id, a.step, a.policy_version_id, a.analysis_id, a.pair_id, pa.prompt_id, pr.problem_id, "
        "pa.correct_rollout_id, pa.incorrect_rollout_id, i.update_id AS internalized_by_update, "
        "u.checkpoint_out AS internalized_in_checkpoint, "
        "a.* EXCLUDE (run_id, step, policy_version_id, analysis_id, pair_id) "
        "FROM analyses a LEFT JOIN pairs pa ON pa.pair_id = a.pair_id "
        "LEFT JOIN prompts pr ON pr.prompt_id = pa.prompt_id "
        f"{_INTERNALIZED_BY.format(key='analysis_id', alias='a')} {where} ORDER BY a.run_id, a.step, a.analysis_id")


def export_heuristics(reader, accepted_only: bool):
    """Every heuristic (text, accepted, cluster) after its lineage; `accepted_only`: those whose replay verified."""
    where = "WHERE h.accepted" if accepted_only else ""
    return reader.query_batches(
        "SELECT h.run_id, h.step, a.policy_version_id, h.heuristic_id, h.analysis_id, a.pair_id, pa.prompt_id, "
        "pr.problem_id, pa.correct_rollout_id, pa.incorrect_rollout_id, i.update_id AS internalized_by_update, "
        "u.checkpoint_out AS internalized_in_checkpoint, h.* EXCLUDE (heuristic_id, analysis_id, run_id, step) "
        "FROM heuristics h LEFT JOIN analyses a ON a.analysis_id = h.analysis_id "
        "LEFT JOIN pairs pa ON pa.pair_id = a.pair_id LEFT JOIN prompts pr ON pr.prompt_id = pa.prompt_id "
        f"{_INTERNALIZED_BY.format(key='heuristic_id', alias='h')} {where} "
        "ORDER BY h.run_id, h.step, h.analysis_id, h.position, h.heuristic_id")


def export_lineage(reader, accepted_only: bool):
    """The heuristic_lineage view, row for row (texts of both rollouts, question, analysis, checkpoint)."""
    where = "WHERE accepted" if accepted_only else ""
    return reader.query_batches(f"SELECT * FROM heuristic_lineage {where} ORDER BY run_id, step, heuristic_id")


# ------------------------------------------------------------------------------ reads for `mel runs`


def runs_with_parent(reader) -> list[dict]:
    """The runs of a store with their config and, where the store has the columns (forks), the parent run; runs
    copied into a fork's store as lineage references (runs.copied_from) are not the store's own and are left out."""
    columns = {r["column_name"] for r in reader.query(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'runs' AND database_name = current_database()")}
    parent = ("parent_run_id, parent_step" if "parent_step" in columns
              else "NULL AS parent_run_id, NULL AS parent_step")
    own = "WHERE copied_from IS NULL" if "copied_from" in columns else ""
    return reader.query(f"SELECT run_id, name, config_json, created_at, {parent} FROM runs {own} "
                        "ORDER BY created_at, run_id")


def stage_executions(reader, run_id: str) -> list[dict]:
    """Every stage execution of a run, oldest first (a retry or a resumed campaign adds rows; none is rewritten
    but to close it)."""
    return reader.query("SELECT step, stage, status, error, started_at, finished_at FROM stage_runs WHERE run_id = ? "
                        "ORDER BY started_at, coalesce(finished_at, started_at), stage_run_id", [run_id])


def updated_steps(reader, run_id: str) -> list[int]:
    """The steps whose update committed (its checkpoint and rows), ascending."""
    return [r["step"] for r in reader.query("SELECT DISTINCT step FROM updates WHERE run_id = ? ORDER BY step",
                                            [run_id])]


def last_checkpoint(reader, run_id: str) -> dict | None:
    """The run's newest checkpoint (step 0: the starting policy)."""
    rows = reader.query("SELECT checkpoint_id, step, path FROM checkpoints WHERE run_id = ? ORDER BY step DESC, "
                        "created_at DESC LIMIT 1", [run_id])
    return rows[0] if rows else None


def last_heldout_accuracy(reader, run_id: str) -> list[dict]:
    """Greedy Pass@1 per dataset at the latest evaluated step (the heldout_accuracy view)."""
    return reader.query("SELECT dataset, step, pass_at_1 FROM heldout_accuracy WHERE run_id = ? AND step = "
                        "(SELECT max(step) FROM heldout_accuracy WHERE run_id = ?) ORDER BY dataset",
                        [run_id, run_id])
# ------------------------------------------------------------------------------- verifier provenance


def verifier_row(verifier) -> dict:
    """The `verifiers` row of a :class:`mel_core.verify.Verifier`: its identity (what decides its verdicts) by
    the hash every reward row it produces carries."""
    identity = verifier.identity
    return {"verifier_hash": verifier.identity_hash, "kind": identity["kind"], "extraction": identity["extraction"],
            "identity_json": json.dumps(identity, sort_keys=True), "created_at": now()}


# ------------------------------------------------------------------------------------- forks


# The chain from one checkpoint up to its base, walking parent_checkpoint_id: only the tables that existed
# before forks did, so it reads older stores as well (the checkpoint_history view is created by newer writers).
_CHAIN = ("WITH RECURSIVE chain(checkpoint_id, depth) AS (SELECT CAST(? AS VARCHAR), 0 UNION ALL "
          "SELECT c.parent_checkpoint_id, ch.depth + 1 FROM chain ch JOIN checkpoints c USING (checkpoint_id) "
          "WHERE c.parent_checkpoint_id IS NOT NULL) ")


def checkpoint_chain(store, checkpoint_id: str) -> list[dict]:
    """The checkpoint and every one before it (its parent, the parent's parent, ... the base), base first, across
    forks; [] when the store does not know the checkpoint."""
    return store.query(_CHAIN + "SELECT c.*, chain.depth FROM chain JOIN checkpoints c USING (checkpoint_id) "
                                "ORDER BY chain.depth DESC", [checkpoint_id])


def checkpoint_history_heuristics(store, checkpoint_id: str) -> list[dict]:
    """Every heuristic internalized on the checkpoint's history (its own update's and every earlier one's, across
    forks), in the order they were learned (the checkpoint_history_heuristics view, for stores of any age)."""
    return store.query(
        _CHAIN + "SELECT chain.depth, u.checkpoint_out AS internalized_in_checkpoint, u.run_id AS internalized_in_run, "
                 "u.update_id, u.step AS update_step, h.heuristic_id, h.text AS heuristic, h.step AS heuristic_step, "
                 "h.run_id AS heuristic_run_id, h.analysis_id FROM chain "
                 "JOIN updates u ON u.checkpoint_out = chain.checkpoint_id JOIN internalized i USING (update_id) "
                 "JOIN heuristics h ON h.heuristic_id = i.heuristic_id ORDER BY chain.depth DESC, h.heuristic_id",
        [checkpoint_id])


def run_checkpoints(store, run_id: str) -> list[dict]:
    """The checkpoints a run had, by step: those it wrote, and the one it started from (its base — whose row another
    run of the same store may have written first — or, for a fork, its parent's)."""
    started_from = "OR c.checkpoint_id IN (SELECT parent_checkpoint_id FROM runs WHERE run_id = ?)" \
        if _has_column(store, "runs", "parent_checkpoint_id") else ""
    return store.query(f"SELECT c.* FROM checkpoints c WHERE c.run_id = ? OR c.checkpoint_id IN "
                       f"(SELECT checkpoint_in FROM updates WHERE run_id = ?) {started_from} ORDER BY c.step",
                       [run_id, run_id] + ([run_id] if started_from else []))


def _has_column(store, table: str, column: str) -> bool:
    return bool(store.query("SELECT 1 FROM duckdb_columns() WHERE table_name = ? AND column_name = ? AND "
                            "database_name = current_database()", [table, column]))


def _rows_where_in(store, table: str, column: str, values) -> list[dict]:
    values = sorted({v for v in values if v is not None})
    if not values:
        return []
    return store.query(f"SELECT * FROM {table} WHERE list_contains(?, {column})", [values])


def lineage_references(store, checkpoint_id: str, source: str) -> dict[str, list[dict]]:
    """What a fork from `checkpoint_id` copies from its parent's store (`store`, a reader of its snapshot) so
    that lineage crosses the fork inside the fork's own file: the checkpoint chain to the base, the updates
    that wrote it, what they internalized, and each internalized heuristic's lineage (analysis, pair, both
    rollouts, prompt), the verifiers of those rollouts and the runs all of it belongs to, marked
    ``copied_from`` = where the row lives in full (`source`, or the file an earlier fork copied it from).
    Nothing else of the parent is copied: no other rollout, replay, metric, evaluation or stage execution."""
    chain = checkpoint_chain(store, checkpoint_id)
    updates = _rows_where_in(store, "updates", "checkpoint_out", [c["checkpoint_id"] for c in chain])
    internalized = _rows_where_in(store, "internalized", "update_id", [u["update_id"] for u in updates])
    heuristics = _rows_where_in(store, "heuristics", "heuristic_id", [i["heuristic_id"] for i in internalized])
    analyses = _rows_where_in(store, "analyses", "analysis_id", [h["analysis_id"] for h in heuristics])
    pairs = _rows_where_in(store, "pairs", "pair_id", [a["pair_id"] for a in analyses])
    rollouts = _rows_where_in(store, "rollouts", "rollout_id",
                              [p[k] for p in pairs for k in ("correct_rollout_id", "incorrect_rollout_id")])
    prompts = _rows_where_in(store, "prompts", "prompt_id", [p["prompt_id"] for p in pairs])
    verifiers = (_rows_where_in(store, "verifiers", "verifier_hash", [r.get("verifier_hash") for r in rollouts])
                 if _has_column(store, "verifiers", "verifier_hash") else [])
    run_ids = {r["run_id"] for rows in (chain, updates, heuristics, analyses, pairs, rollouts, prompts) for r in rows}
    runs = [{**r, "copied_from": r.get("copied_from") or source}
            for r in _rows_where_in(store, "runs", "run_id", run_ids)]
    chain = [{k: v for k, v in c.items() if k != "depth"} for c in chain]
    return {"runs": runs, "checkpoints": chain, "updates": updates, "internalized": internalized,
            "heuristics": heuristics, "analyses": analyses, "pairs": pairs, "rollouts": rollouts, "prompts": prompts,
            "verifiers": verifiers}


# ------------------------------------------------------------------------------------- re-scoring


def records_to_rescore(store, run_id: str) -> list[dict]:
    """Every verified reward record of the run — rollouts, replays, evaluation samples — with what verifying it
    again takes: its text, gold answer and how its generation ended (a replay written before replays kept their
    finish_reason ended at the length limit if it was scored 'truncated')."""
    return store.query(
        "SELECT 'rollout' AS record_kind, r.rollout_id AS record_id, r.text, p.answer, r.finish_reason, "
        "NULL AS dataset FROM rollouts r JOIN prompts p USING (prompt_id) WHERE r.run_id = ? AND r.reward IS NOT NULL "
        "UNION ALL "
        "SELECT 'replay', rp.replay_id, rp.text, p.answer, coalesce(rp.finish_reason, CASE WHEN rp.verify_reason = "
        "'truncated' THEN 'length' END), NULL FROM replays rp JOIN analyses a USING (analysis_id) "
        "JOIN pairs pa ON pa.pair_id = a.pair_id JOIN prompts p ON p.prompt_id = coalesce(rp.prompt_id, pa.prompt_id) "
        "WHERE rp.run_id = ? AND rp.reward IS NOT NULL "
        "UNION ALL "
        "SELECT 'eval_sample', s.sample_id, s.text, s.answer, s.finish_reason, s.dataset FROM eval_samples s "
        "WHERE s.run_id = ? AND s.reward IS NOT NULL ORDER BY record_kind, record_id", [run_id, run_id, run_id])


def rescored_ids(store, run_id: str, verifier_hashes: list[str]) -> set[tuple[str, str]]:
    """(record_id, verifier_hash) of the run's records already scored by one of these verifiers."""
    return {(r["record_id"], r["verifier_hash"]) for r in store.query(
        "SELECT record_id, verifier_hash FROM rewards WHERE run_id = ? AND list_contains(?, verifier_hash)",
        [run_id, verifier_hashes])}


def rescore_totals(store, run_id: str, verifier_hashes: list[str]) -> list[dict]:
    """Per record kind and dataset: how many rewards the verifiers gave, and how many differ from the original
    (down: 1 -> 0, up: 0 -> 1)."""
    return store.query(
        "SELECT v.record_kind AS kind, v.dataset, count(*) AS rescored, count(f.record_id) AS flipped, "
        "count(*) FILTER (WHERE f.old_reward > f.new_reward) AS down, "
        "count(*) FILTER (WHERE f.old_reward < f.new_reward) AS up "
        "FROM reward_versions v LEFT JOIN reward_flips f ON f.record_id = v.record_id "
        "AND f.new_verifier_hash = v.verifier_hash "
        "WHERE v.rescored AND v.run_id = ? AND list_contains(?, v.verifier_hash) GROUP BY ALL ORDER BY ALL",
        [run_id, verifier_hashes])


def reward_flips(store, run_id: str, verifier_hashes: list[str], limit: int | None = None) -> list[dict]:
    """The run's records whose reward under these verifiers differs from the original (reward_flips view)."""
    return store.query("SELECT * FROM reward_flips WHERE run_id = ? AND list_contains(?, new_verifier_hash) "
                       f"ORDER BY record_kind, step, record_id {'' if limit is None else f'LIMIT {int(limit)}'}",
                       [run_id, verifier_hashes])


def heuristic_acceptance_flips(store, run_id: str, verifier_hashes: list[str]) -> list[dict]:
    """The run's heuristics whose acceptance would change under these verifiers (lost: accepted, would not be)."""
    return store.query("SELECT * FROM heuristic_acceptance_flips WHERE run_id = ? AND list_contains(?, verifier_hash) "
                       "ORDER BY NOT lost, step, heuristic_id", [run_id, verifier_hashes])


def original_verifiers(store, run_id: str) -> list[dict]:
    """The verifiers that produced the run's original rewards, with how many each (NULL: not recorded)."""
    return store.query("SELECT o.verifier_hash, v.kind, v.extraction, count(*) AS n FROM original_rewards o "
                       "LEFT JOIN verifiers v USING (verifier_hash) WHERE o.run_id = ? GROUP BY ALL ORDER BY n DESC",
                       [run_id])
