"""The store's schema: its tables, the lineage and reward-version views over them, and each table's primary key.

A row's id is deterministic (mel_core.ids.make_id), so a table's primary key is what makes a second write of the
same record a no-op. Columns are only ever added (a writer adds the missing ones to an older file); views are
recreated by every writer that opens a file.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 1
STORE_FORMAT = "mel-store"  # meta.format of every store this code creates (older stores have schema_version only)

TABLES: dict[str, str] = {
    "meta": """
        key VARCHAR PRIMARY KEY,
        value VARCHAR""",
    "runs": """
        run_id VARCHAR PRIMARY KEY,
        name VARCHAR,
        config_hash VARCHAR,
        config_json VARCHAR,
        created_at TIMESTAMP,
        parent_run_id VARCHAR,
        parent_step INTEGER,
        parent_checkpoint_id VARCHAR,
        copied_from VARCHAR,
        model_json VARCHAR""",
    "steps": """
        step_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        step INTEGER,
        policy_version_id VARCHAR,
        seed BIGINT""",
    "prompts": """
        prompt_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        step INTEGER,
        position INTEGER,
        problem_id VARCHAR,
        question VARCHAR,
        answer VARCHAR,
        prompt_text VARCHAR,
        row_json VARCHAR""",
    "rollouts": """
        rollout_id VARCHAR PRIMARY KEY,
        prompt_id VARCHAR,
        run_id VARCHAR,
        step INTEGER,
        sample_index INTEGER,
        policy_version_id VARCHAR,
        text VARCHAR,
        token_ids INTEGER[],
        num_tokens INTEGER,
        finish_reason VARCHAR,
        reward DOUBLE,
        extracted_answer VARCHAR,
        verify_reason VARCHAR,
        verifier_hash VARCHAR""",
    "pairs": """
        pair_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        step INTEGER,
        prompt_id VARCHAR,
        correct_rollout_id VARCHAR,
        incorrect_rollout_id VARCHAR""",
    "analyses": """
        analysis_id VARCHAR PRIMARY KEY,
        pair_id VARCHAR,
        run_id VARCHAR,
        step INTEGER,
        policy_version_id VARCHAR,
        prompt_text VARCHAR,
        raw_text VARCHAR,
        token_ids INTEGER[],
        num_tokens INTEGER,
        bifurcation_step INTEGER,
        critique VARCHAR,
        parsed BOOLEAN,
        status VARCHAR,
        reject_reason VARCHAR,
        mode VARCHAR,
        abstract_prompt_text VARCHAR,
        abstract_text VARCHAR,
        abstract_token_ids INTEGER[],
        finish_reason VARCHAR,
        abstract_finish_reason VARCHAR,
        retro_shortened BOOLEAN,
        bifurcation VARCHAR,
        replay_text VARCHAR,
        trained_text VARCHAR,
        trained_token_ids INTEGER[],
        trained_parts UTINYINT[],
        abstract_trained_text VARCHAR,
        abstract_trained_token_ids INTEGER[],
        abstract_trained_parts UTINYINT[],
        trained_tokens INTEGER,
        analyst VARCHAR""",
    "heuristics": """
        heuristic_id VARCHAR PRIMARY KEY,
        analysis_id VARCHAR,
        run_id VARCHAR,
        step INTEGER,
        position INTEGER,
        text VARCHAR,
        accepted BOOLEAN,
        cluster_id VARCHAR,
        cluster_similarity DOUBLE""",
    # The heuristic library's clusters (mel_core.store.library): one per founding heuristic, with its feature
    # vector (FLOAT[512] = library.FEATURE_DIM) and the method + threshold it was clustered with.
    "library_clusters": """
        cluster_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        founder_heuristic_id VARCHAR,
        step INTEGER,
        method VARCHAR,
        features FLOAT[512]""",
    "replays": """
        replay_id VARCHAR PRIMARY KEY,
        analysis_id VARCHAR,
        run_id VARCHAR,
        step INTEGER,
        replay_index INTEGER,
        prompt_text VARCHAR,
        text VARCHAR,
        reward DOUBLE,
        verify_reason VARCHAR,
        kind VARCHAR,
        prompt_id VARCHAR,
        finish_reason VARCHAR,
        extracted_answer VARCHAR,
        verifier_hash VARCHAR,
        token_ids INTEGER[]""",
    "checkpoints": """
        checkpoint_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        step INTEGER,
        path VARCHAR,
        parent_checkpoint_id VARCHAR,
        created_at TIMESTAMP,
        pruned_at TIMESTAMP""",
    # pruned_at: when run.keep_checkpoints deleted the checkpoint's directory (mel_core.run.retention); its rows stay.
    # Every file of a checkpoint a run wrote, as it was written (mel_core.model.checkpoints.file_digests), committed
    # with its checkpoints row: a load that trains or evaluates checks them first, `mel verify` checks them all.
    # Checkpoints of older stores (and the base model, which no run writes) have none and load unchecked. pruned_at:
    # when retention deleted the file (the optimizer state of a checkpoint that is no longer the newest).
    "checkpoint_files": """
        checkpoint_id VARCHAR,
        file VARCHAR,
        size BIGINT,
        digest VARCHAR,
        algorithm VARCHAR,
        pruned_at TIMESTAMP,
        PRIMARY KEY (checkpoint_id, file)""",
    "updates": """
        update_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        step INTEGER,
        checkpoint_in VARCHAR,
        checkpoint_out VARCHAR,
        loss DOUBLE,
        rl_loss DOUBLE,
        nll_loss DOUBLE,
        grad_norm DOUBLE,
        num_sequences INTEGER,
        num_nll_sequences INTEGER""",
    "internalized": """
        update_id VARCHAR,
        analysis_id VARCHAR,
        heuristic_id VARCHAR,
        PRIMARY KEY (update_id, heuristic_id)""",
    "metrics": """
        run_id VARCHAR,
        step INTEGER,
        name VARCHAR,
        value DOUBLE,
        PRIMARY KEY (run_id, step, name)""",
    # One row per (checkpoint, dataset, metric): 'pass@1' is greedy (temperature 0, k 1); 'avg@K' and
    # 'pass@K' come from K samples at eval.temperature (Pass@K: unbiased estimator, mel_core.study.metrics).
    "evals": """
        eval_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        checkpoint_id VARCHAR,
        step INTEGER,
        dataset VARCHAR,
        metric VARCHAR,
        k INTEGER,
        temperature DOUBLE,
        value DOUBLE,
        num_problems INTEGER,
        seconds DOUBLE,
        created_at TIMESTAMP""",
    # Every evaluation generation with its verdict, to read failures in SQL (greedy: sample_index 0).
    "eval_samples": """
        sample_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        checkpoint_id VARCHAR,
        step INTEGER,
        dataset VARCHAR,
        problem_id VARCHAR,
        question VARCHAR,
        answer VARCHAR,
        greedy BOOLEAN,
        temperature DOUBLE,
        sample_index INTEGER,
        text VARCHAR,
        num_tokens INTEGER,
        finish_reason VARCHAR,
        reward DOUBLE,
        extracted_answer VARCHAR,
        verify_reason VARCHAR,
        created_at TIMESTAMP,
        verifier_hash VARCHAR,
        row_json VARCHAR""",
    # Every verifier that produced a reward here: its identity (mel_core.algorithm.rewards.verifier.Verifier.identity: logic version,
    # kind, extraction, truncation rule, time limit, math-verify's and its parser's versions) by its hash.
    "verifiers": """
        verifier_hash VARCHAR PRIMARY KEY,
        kind VARCHAR,
        extraction VARCHAR,
        identity_json VARCHAR,
        created_at TIMESTAMP""",
    # Re-scorings (`mel rescore`, mel_core.study.rescore): a record's reward under another verifier, beside the one it
    # was produced with (which stays in its own table, untouched). record_kind: rollout | replay | eval_sample.
    "rewards": """
        record_id VARCHAR,
        verifier_hash VARCHAR,
        record_kind VARCHAR,
        run_id VARCHAR,
        reward DOUBLE,
        extracted_answer VARCHAR,
        verify_reason VARCHAR,
        created_at TIMESTAMP,
        PRIMARY KEY (record_id, verifier_hash)""",
    "stage_runs": """
        stage_run_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        step INTEGER,
        stage VARCHAR,
        cache_key VARCHAR,
        started_at TIMESTAMP,
        finished_at TIMESTAMP,
        seconds DOUBLE,
        status VARCHAR,
        error VARCHAR""",
}

# Lineage across forks (docs/DESIGN.md, "Forks"). Every checkpoint with each checkpoint on its history (itself at
# depth 0, then its parent_checkpoint_id, and so on to the base), whichever run wrote them: a fork's store holds
# its parent's chain as copied references, so the walk crosses the fork without opening another file. The SQL is
# also run inline by readers of stores written before these views existed (mel_core.store).
LINEAGE_VIEWS: dict[str, str] = {
    "checkpoint_history": """
        WITH RECURSIVE chain(checkpoint_id, ancestor_id, depth) AS (
            SELECT checkpoint_id, checkpoint_id, 0 FROM checkpoints
            UNION ALL
            SELECT ch.checkpoint_id, c.parent_checkpoint_id, ch.depth + 1
            FROM chain ch JOIN checkpoints c ON c.checkpoint_id = ch.ancestor_id
            WHERE c.parent_checkpoint_id IS NOT NULL)
        SELECT ch.checkpoint_id, ch.depth, a.checkpoint_id AS ancestor_checkpoint_id, a.run_id AS ancestor_run_id,
               a.step AS ancestor_step, a.path AS ancestor_path, a.parent_checkpoint_id AS ancestor_parent_id
        FROM chain ch JOIN checkpoints a ON a.checkpoint_id = ch.ancestor_id""",
}
# Every heuristic internalized on a checkpoint's history: by the update that wrote it or by any update before,
# in this run or, across a fork, in its parent's.
LINEAGE_VIEWS["checkpoint_history_heuristics"] = f"""
        SELECT hist.checkpoint_id, hist.depth, hist.ancestor_checkpoint_id AS internalized_in_checkpoint,
               hist.ancestor_run_id AS internalized_in_run, u.update_id, u.step AS update_step, h.heuristic_id,
               h.text AS heuristic, h.step AS heuristic_step, h.run_id AS heuristic_run_id, h.analysis_id
        FROM ({LINEAGE_VIEWS["checkpoint_history"]}) hist
        JOIN updates u ON u.checkpoint_out = hist.ancestor_checkpoint_id
        JOIN internalized i ON i.update_id = u.update_id
        JOIN heuristics h ON h.heuristic_id = i.heuristic_id"""

# Rewards and their re-scorings (mel_core.study.rescore). original_rewards: every verified record as it was scored when
# it was produced (the reward training or evaluation used) with the verifier that scored it (NULL: scored before
# verifier provenance was recorded).
REWARD_VIEWS: dict[str, str] = {
    "original_rewards": """
        SELECT 'rollout' AS record_kind, r.rollout_id AS record_id, r.run_id, r.step,
               split_part(p.problem_id, ':', 1) AS dataset, p.problem_id, p.answer, r.text, r.verifier_hash,
               r.reward, r.extracted_answer, r.verify_reason
        FROM rollouts r JOIN prompts p USING (prompt_id) WHERE r.reward IS NOT NULL
        UNION ALL
        SELECT 'replay', rp.replay_id, rp.run_id, rp.step, split_part(p.problem_id, ':', 1), p.problem_id, p.answer,
               rp.text, rp.verifier_hash, rp.reward, rp.extracted_answer, rp.verify_reason
        FROM replays rp JOIN analyses a USING (analysis_id) JOIN pairs pa ON pa.pair_id = a.pair_id
        JOIN prompts p ON p.prompt_id = coalesce(rp.prompt_id, pa.prompt_id) WHERE rp.reward IS NOT NULL
        UNION ALL
        SELECT 'eval_sample', s.sample_id, s.run_id, s.step, s.dataset, s.problem_id, s.answer, s.text,
               s.verifier_hash, s.reward, s.extracted_answer, s.verify_reason
        FROM eval_samples s WHERE s.reward IS NOT NULL""",
}
# Every reward of every record: the original (rescored = false) and each re-scoring, with its verifier.
REWARD_VIEWS["reward_versions"] = f"""
        SELECT o.record_kind, o.record_id, o.run_id, o.step, o.dataset, o.problem_id, false AS rescored,
               o.verifier_hash, o.reward, o.extracted_answer, o.verify_reason
        FROM ({REWARD_VIEWS["original_rewards"]}) o
        UNION ALL
        SELECT o.record_kind, o.record_id, o.run_id, o.step, o.dataset, o.problem_id, true, n.verifier_hash,
               n.reward, n.extracted_answer, n.verify_reason
        FROM ({REWARD_VIEWS["original_rewards"]}) o JOIN rewards n USING (record_id)"""
# The records whose reward under a re-scoring verifier (new_verifier_hash) differs from their original one.
REWARD_VIEWS["reward_flips"] = f"""
        SELECT o.record_kind, o.record_id, o.run_id, o.step, o.dataset, o.problem_id, o.answer,
               o.verifier_hash AS old_verifier_hash, n.verifier_hash AS new_verifier_hash,
               o.reward AS old_reward, n.reward AS new_reward, o.extracted_answer AS old_extracted,
               n.extracted_answer AS new_extracted, o.verify_reason AS old_reason, n.verify_reason AS new_reason, o.text
        FROM ({REWARD_VIEWS["original_rewards"]}) o JOIN rewards n USING (record_id)
        WHERE n.reward IS DISTINCT FROM o.reward"""
# Per analysis that reached the replay and per re-scoring verifier of its replays: accepted as recorded, and
# whether its own replays ('self') would still pass the run's rule (experience.accept_min_correct correct
# replays) under that verifier. experience.filter: none accepted every candidate, so nothing changes there; an
# analysis rejected by its transfer replays stays rejected (transfers are not re-judged).
REWARD_VIEWS["replay_acceptance"] = """
        WITH rule AS (
            SELECT run_id,
                   coalesce(TRY_CAST(json_extract_string(config_json, '$.experience.accept_min_correct') AS INTEGER),
                            1) AS min_correct,
                   coalesce(json_extract_string(config_json, '$.experience.filter'), 'replay') AS filter
            FROM runs),
        judged AS (
            SELECT rp.analysis_id, n.verifier_hash, count(*) AS replays,
                   count(*) FILTER (WHERE rp.reward > 0) AS correct_before,
                   count(*) FILTER (WHERE n.reward > 0) AS correct_after
            FROM replays rp JOIN rewards n ON n.record_id = rp.replay_id
            WHERE coalesce(rp.kind, 'self') = 'self'
            GROUP BY rp.analysis_id, n.verifier_hash)
        SELECT a.run_id, a.step, a.analysis_id, j.verifier_hash, a.status, a.reject_reason, j.replays,
               j.correct_before, j.correct_after, rule.min_correct, a.status = 'accepted' AS accepted_before,
               CASE WHEN rule.filter = 'none' THEN a.status = 'accepted'
                    WHEN a.reject_reason = 'transfer_failed' THEN false
                    ELSE j.correct_after >= rule.min_correct END AS accepted_after
        FROM judged j JOIN analyses a USING (analysis_id) JOIN rule ON rule.run_id = a.run_id"""
# "Which accepted heuristics would not have been accepted under the new verifier?" — and the reverse: one row per
# heuristic whose analysis's acceptance changes under a re-scoring verifier (lost: accepted, would not be).
REWARD_VIEWS["heuristic_acceptance_flips"] = f"""
        SELECT h.heuristic_id, h.text AS heuristic, h.run_id, h.step, ra.analysis_id, ra.verifier_hash,
               ra.accepted_before, ra.accepted_after, ra.accepted_before AND NOT ra.accepted_after AS lost,
               ra.replays, ra.correct_before, ra.correct_after, ra.min_correct
        FROM ({REWARD_VIEWS["replay_acceptance"]}) ra JOIN heuristics h USING (analysis_id)
        WHERE ra.accepted_before IS DISTINCT FROM ra.accepted_after"""

VIEWS: dict[str, str] = {
    # One row per heuristic with everything it came from, and the update/checkpoint that learned it.
    "heuristic_lineage": """
        SELECT h.heuristic_id, h.text AS heuristic, h.accepted, h.step, h.cluster_id,
               a.analysis_id, a.bifurcation_step, a.bifurcation, a.critique, a.status AS analysis_status,
               a.trained_text, a.abstract_trained_text, a.trained_tokens,
               pa.pair_id, pa.correct_rollout_id, rc.text AS correct_text,
               pa.incorrect_rollout_id, ri.text AS incorrect_text,
               pr.prompt_id, pr.problem_id, pr.question, pr.answer,
               a.policy_version_id, r.run_id, r.name AS run_name,
               i.update_id AS internalized_by_update, u.checkpoint_out AS internalized_in_checkpoint
        FROM heuristics h
        JOIN analyses a ON a.analysis_id = h.analysis_id
        JOIN pairs pa ON pa.pair_id = a.pair_id
        JOIN rollouts rc ON rc.rollout_id = pa.correct_rollout_id
        JOIN rollouts ri ON ri.rollout_id = pa.incorrect_rollout_id
        JOIN prompts pr ON pr.prompt_id = pa.prompt_id
        JOIN runs r ON r.run_id = h.run_id
        LEFT JOIN internalized i ON i.heuristic_id = h.heuristic_id
        LEFT JOIN updates u ON u.update_id = i.update_id""",
    # Every heuristic a checkpoint internalized: "which checkpoint learned this?" read backwards.
    "checkpoint_heuristics": """
        SELECT c.checkpoint_id, c.step AS checkpoint_step, c.path, u.update_id, h.heuristic_id,
               h.text AS heuristic, h.step AS heuristic_step, h.analysis_id
        FROM checkpoints c
        JOIN updates u ON u.checkpoint_out = c.checkpoint_id
        JOIN internalized i ON i.update_id = u.update_id
        JOIN heuristics h ON h.heuristic_id = i.heuristic_id""",
    # The heuristic library: per cluster of near-duplicate heuristics (mel_core.store.library), how often the
    # rule was produced (written by abstract), accepted (its replay verified) and internalized (trained
    # on by an update), over how many steps, and a representative text (the text accepted most often,
    # then produced most often, then the first in sort order).
    "heuristic_clusters": """
        WITH members AS (
            SELECT h.run_id, h.cluster_id, h.heuristic_id, h.step, h.text, coalesce(h.accepted, false) AS accepted,
                   i.heuristic_id IS NOT NULL AS internalized
            FROM heuristics h LEFT JOIN (SELECT DISTINCT heuristic_id FROM internalized) i USING (heuristic_id)
            WHERE h.cluster_id IS NOT NULL),
        texts AS (
            SELECT cluster_id, text, row_number() OVER (PARTITION BY cluster_id ORDER BY count(*) FILTER (WHERE accepted)
                                                        DESC, count(*) DESC, text) AS rank
            FROM members GROUP BY cluster_id, text)
        SELECT c.run_id, c.cluster_id, t.text AS representative, count(*) AS produced,
               count(*) FILTER (WHERE m.accepted) AS accepted, count(*) FILTER (WHERE m.internalized) AS internalized,
               count(DISTINCT m.text) AS distinct_texts, count(DISTINCT m.step) AS steps, c.step AS first_step,
               max(m.step) AS last_step, c.founder_heuristic_id, c.method
        FROM library_clusters c JOIN members m USING (cluster_id) JOIN texts t ON t.cluster_id = c.cluster_id AND t.rank = 1
        GROUP BY c.run_id, c.cluster_id, t.text, c.step, c.founder_heuristic_id, c.method""",
    "step_summary": """
        SELECT run_id, step,
               max(CASE WHEN name = 'reward_mean' THEN value END) AS reward_mean,
               max(CASE WHEN name = 'mixed_groups' THEN value END) AS mixed_groups,
               max(CASE WHEN name = 'analyses' THEN value END) AS analyses,
               max(CASE WHEN name = 'accepted' THEN value END) AS accepted,
               max(CASE WHEN name = 'retention_ratio' THEN value END) AS retention_ratio,
               max(CASE WHEN name = 'nll_loss' THEN value END) AS nll_loss
        FROM metrics GROUP BY run_id, step""",
    # Acceptance and retention per step, from the records themselves (live while the step runs): pairs,
    # analyses, those whose text did not parse, candidates that reached replay, accepted ones.
    "step_acceptance": """
        SELECT pa.run_id, pa.step, count(*) AS pairs, count(a.analysis_id) AS analyses,
               count(*) FILTER (WHERE a.status = 'rejected' AND a.reject_reason <> 'replay_failed') AS unparsed,
               count(*) FILTER (WHERE a.status IN ('candidate', 'accepted')
                                   OR a.reject_reason = 'replay_failed') AS candidates,
               count(*) FILTER (WHERE a.status = 'accepted') AS accepted,
               accepted / nullif(candidates, 0) AS retention_ratio,
               accepted / nullif(analyses, 0) AS acceptance_rate
        FROM pairs pa LEFT JOIN analyses a USING (pair_id)
        WHERE pa.run_id NOT IN (SELECT run_id FROM runs WHERE copied_from IS NOT NULL)
        GROUP BY pa.run_id, pa.step""",
    # Held-out accuracy per step: greedy Pass@1 and the sampled Avg@k / Pass@k side by side.
    "heldout_accuracy": """
        SELECT run_id, dataset, step, checkpoint_id,
               max(CASE WHEN metric = 'pass@1' AND temperature = 0 THEN value END) AS pass_at_1,
               max(CASE WHEN metric LIKE 'avg@%' THEN value END) AS avg_at_k,
               max(CASE WHEN metric LIKE 'pass@%' AND temperature > 0 THEN value END) AS pass_at_k,
               max(CASE WHEN temperature > 0 THEN k END) AS k,
               max(num_problems) AS num_problems
        FROM evals GROUP BY run_id, dataset, step, checkpoint_id""",
    "stage_timings": """
        SELECT run_id, step, stage, count(*) AS executions, sum(seconds) AS seconds
        FROM stage_runs WHERE status = 'completed' GROUP BY run_id, step, stage""",
    **LINEAGE_VIEWS,
    **REWARD_VIEWS,
}


def _primary_key(ddl: str) -> dict[str, str]:
    """{column: SQL type} of a table's primary key, from its column list in TABLES."""
    lines = [ln.strip().rstrip(",") for ln in ddl.strip().splitlines()]
    types = {ln.split()[0]: ln.split()[1] for ln in lines if not ln.startswith("PRIMARY KEY")}
    m = re.search(r"PRIMARY KEY\s*\(([^)]*)\)", ddl)
    cols = [c.strip() for c in m.group(1).split(",")] if m else [ln.split()[0] for ln in lines
                                                                 if ln.endswith("PRIMARY KEY")]
    return {c: types[c] for c in cols}


PRIMARY_KEYS: dict[str, dict[str, str]] = {t: _primary_key(ddl) for t, ddl in TABLES.items()}
