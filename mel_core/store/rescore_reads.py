"""What `mel rescore` reads: every verified reward record of a run, which of them a verifier already scored, and
what changed under the new verifier (its totals, the flipped records, the heuristics whose acceptance would flip).
"""

from __future__ import annotations


def records_to_rescore(store, run_id: str) -> list[dict]:
    """Every verified reward record of the run — rollouts, replays, evaluation samples — with what verifying it
    again takes: its text, gold answer, problem (id, question, data row: what a reward plug-in is given) and how
    its generation ended (a replay written before replays kept their
    finish_reason ended at the length limit if it was scored 'truncated')."""
    return store.query(
        "SELECT 'rollout' AS record_kind, r.rollout_id AS record_id, r.text, p.answer, r.finish_reason, "
        "NULL AS dataset, p.problem_id, p.question, p.row_json FROM rollouts r JOIN prompts p USING (prompt_id) "
        "WHERE r.run_id = ? AND r.reward IS NOT NULL "
        "UNION ALL "
        "SELECT 'replay', rp.replay_id, rp.text, p.answer, coalesce(rp.finish_reason, CASE WHEN rp.verify_reason = "
        "'truncated' THEN 'length' END), NULL, p.problem_id, p.question, p.row_json FROM replays rp JOIN analyses a USING (analysis_id) "
        "JOIN pairs pa ON pa.pair_id = a.pair_id JOIN prompts p ON p.prompt_id = coalesce(rp.prompt_id, pa.prompt_id) "
        "WHERE rp.run_id = ? AND rp.reward IS NOT NULL "
        "UNION ALL "
        "SELECT 'eval_sample', s.sample_id, s.text, s.answer, s.finish_reason, s.dataset, s.problem_id, s.question, "
        "s.row_json FROM eval_samples s "
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
