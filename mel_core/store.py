"""The DuckDB system of record: schema, idempotent writes, lineage views, and readers that cannot harm it.

Every record has a deterministic id derived from its content and position (see :func:`make_id`), and
every write is ``INSERT OR IGNORE``, so writing the same record twice is a no-op and a re-run or a
resumed stage never duplicates rows.

Concurrency (docs/DESIGN.md, "The store"): DuckDB lets one process hold a file for writing and blocks every
other process, readers included, while it does. So readers never open the campaign's file. After every
committed stage the writer *publishes* a snapshot: ``CHECKPOINT``, a copy of the file beside it
(``mel.snapshot.duckdb``) renamed into place. A reader (:class:`StoreReader`, what ``mel query``, ``mel
lineage``, ``mel report``, ``mel eval`` and the Python read API use) opens the snapshot, so it sees the state as
of the last committed stage and holds no lock the writer needs, however long its query runs; a newer snapshot
replaces the file's name, not the file a reader has open.

Readers are read-only by construction, not by a statement classifier: their connection is opened read-only
with DuckDB's own locks on everything outside the file — no external file access (no ``COPY … TO``, ``EXPORT``,
``ATTACH`` of files, ``read_csv``), no extension install or autoload, no persistent secrets, no spilling to a
temp directory, and the configuration locked after setup (no ``SET``/``RESET``/``PRAGMA`` that changes it).
:func:`check_read_only` refuses anything but one SELECT-like statement before it reaches DuckDB, as a second
layer with a clearer message.

A writer refuses a file that is not a mel store (:class:`ForeignStore`) or that cannot be read whole
(:class:`CorruptStore`) before writing anything to it; both are permanent errors (never retried).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from mel_core.errors import PermanentError
from mel_core.files import copy_file_atomically

SCHEMA_VERSION = 1
DB_FILE = "mel.duckdb"  # a run directory's store (its snapshot: snapshot_path)
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
        copied_from VARCHAR""",
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
        prompt_text VARCHAR""",
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
    # The heuristic library's clusters (mel_core.library): one per founding heuristic, with its feature
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
        verifier_hash VARCHAR""",
    "checkpoints": """
        checkpoint_id VARCHAR PRIMARY KEY,
        run_id VARCHAR,
        step INTEGER,
        path VARCHAR,
        parent_checkpoint_id VARCHAR,
        created_at TIMESTAMP""",
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
    # 'pass@K' come from K samples at eval.temperature (Pass@K: unbiased estimator, mel_core.metrics).
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
        verifier_hash VARCHAR""",
    # Every verifier that produced a reward here: its identity (mel_core.verify.Verifier.identity: logic version,
    # kind, extraction, truncation rule, time limit, math-verify's and its parser's versions) by its hash.
    "verifiers": """
        verifier_hash VARCHAR PRIMARY KEY,
        kind VARCHAR,
        extraction VARCHAR,
        identity_json VARCHAR,
        created_at TIMESTAMP""",
    # Re-scorings (`mel rescore`, mel_core.rescore): a record's reward under another verifier, beside the one it
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
# also run inline by readers of stores written before these views existed (mel_core.records).
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

# Rewards and their re-scorings (mel_core.rescore). original_rewards: every verified record as it was scored when
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
    # The heuristic library: per cluster of near-duplicate heuristics (mel_core.library), how often the
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

# A batch at least this fraction of its table's size skips existing keys with one anti-join (a scan of
# the key column, ~0.05 us/row) instead of INSERT OR IGNORE (~60 us per inserted row); see
# docs/BENCHMARKS.md, "store.py".
_ANTI_JOIN_MIN_FRACTION = 1e-3
_ARROW_KEY_TYPES = {"VARCHAR": (pa.types.is_string, pa.types.is_large_string),
                    "INTEGER": (pa.types.is_integer,), "BIGINT": (pa.types.is_integer,)}


def make_id(prefix: str, *parts: Any) -> str:
    """Deterministic id from content and position: the same inputs always give the same id."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{prefix}_{h}"


class StoreError(RuntimeError):
    pass


class ReadOnlyViolation(StoreError, PermanentError):
    """A statement a reader may not run."""


class ForeignStore(StoreError, PermanentError):
    """A file that is not a mel store (not DuckDB, or a DuckDB file of someone else's): never written to."""


class CorruptStore(StoreError, PermanentError):
    """A mel store that cannot be read whole (truncated, damaged): never written to."""


class MissingStore(StoreError, PermanentError):
    """No store at the given path."""


# What a reader's connection may not do, whatever SQL it is given (DuckDB 2.0 settings; see the module doc).
READER_SETTINGS = {
    "enable_external_access": False,       # no COPY TO / EXPORT / ATTACH of files / read_csv / glob / INSTALL
    "autoinstall_known_extensions": False,  # a table function of an extension must not download it
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_persistent_secrets": False,      # CREATE PERSISTENT SECRET would write under ~/.duckdb
    "python_enable_replacements": False,    # the Python API must not scan the caller's variables
    "temp_directory": "",                   # no spill files: a huge query fails instead of writing to disk
}
# Set on the connection once it is open, the last one locking every setting: no SET / RESET / PRAGMA can undo
# any of the above afterwards.
READER_SESSION = ("SET enable_progress_bar = false",  # a long query must not draw on the caller's stdout
                  "SET lock_configuration = true")


def snapshot_path(path: str | Path) -> Path:
    """Where the readers' snapshot of a store lives: ``mel.duckdb`` -> ``mel.snapshot.duckdb``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.snapshot{path.suffix}")


def _connect_with_retry(path: Path, wait_s: float, read_only: bool, config: dict | None = None):
    """Open, retrying while another process holds the file's lock (another writer mid-write)."""
    deadline = time.monotonic() + wait_s
    delay = 0.02
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=dict(config or {}))
        except duckdb.IOException as e:
            if "lock" not in str(e).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    return _connect_with_retry(path, wait_s, read_only)


def _connect_reader(path: Path, wait_s: float) -> duckdb.DuckDBPyConnection:
    """A read-only connection with READER_SETTINGS; a file DuckDB cannot open is named as what it is."""
    try:
        con = _connect_with_retry(path, wait_s, read_only=True, config=READER_SETTINGS)
    except duckdb.IOException as e:
        raise _open_error(path, e) from e
    # A process's connections to one file share a DuckDB instance: the first reader set and locked it already.
    if not con.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
        for statement in READER_SESSION:
            con.execute(statement)
    return con


def _open_error(path: Path, e: Exception) -> StoreError:
    msg = str(e).splitlines()[0]
    if "not a valid DuckDB database file" in msg:
        return ForeignStore(f"{path} is not a DuckDB file, so not a mel store; nothing was written to it")
    if "lock" in msg.lower():
        return StoreError(f"{path} is held by another process ({msg})")
    return CorruptStore(f"{path} cannot be read ({msg}); nothing was written to it")


def _check_mel_store(con: duckdb.DuckDBPyConnection, path: Path, scan: bool) -> None:
    """ForeignStore unless the file holds mel's meta table with a schema version this code reads; with
    `scan`, CorruptStore unless every table reads whole (a truncated file can open and fail only on the
    blocks it lost: a writer must find out before it appends to it)."""
    try:
        has_meta = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'meta' AND "
                               "database_name = current_database()").fetchall()[0][0]
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall()) if has_meta else {}
    except duckdb.Error as e:
        raise _open_error(path, e) from e
    if "schema_version" not in meta:
        raise ForeignStore(f"{path} is a DuckDB file but not a mel store (no mel meta table); nothing was "
                           f"written to it")
    if not str(meta["schema_version"]).isdigit() or int(meta["schema_version"]) > SCHEMA_VERSION:
        raise ForeignStore(f"{path} is a mel store of a newer schema ({meta['schema_version']}) than this "
                           f"mel reads ({SCHEMA_VERSION}); nothing was written to it")
    if not scan:
        return
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE "
                                        "database_name = current_database()").fetchall()]
    try:
        for t in tables:
            con.execute(f'SELECT count(*), max(hash("{t}")) FROM "{t}"').fetchall()  # reads every column
    except duckdb.Error as e:
        raise CorruptStore(f"{path} is damaged: {str(e).splitlines()[0]}; nothing was written to it (the "
                           f"last published snapshot, if any, is {snapshot_path(path)})") from e


def _checked_connection(path: Path, wait_s: float, scan: bool) -> duckdb.DuckDBPyConnection:
    """A reader's connection to `path` once _check_mel_store passed; on failure the connection is closed and
    the error raised without a traceback that would keep it alive (DuckDB's bindings report connections still
    alive at exit, and an orchestrator may keep a failed run's exception for the life of the process)."""
    con = _connect_reader(path, wait_s)
    problem = None
    try:
        _check_mel_store(con, path, scan=scan)
    except StoreError as e:
        problem = e.with_traceback(None)
    if problem is None:
        return con
    con.close()
    del con
    raise problem from None


def verify_store(path: str | Path, lock_wait_s: float = 60.0) -> None:
    """ForeignStore / CorruptStore unless `path` is a mel store that reads whole; reads only (what a writer
    checks before its first write to an existing file, and `mel run` before Prefect starts)."""
    _checked_connection(Path(path), lock_wait_s, scan=True).close()


def _unregister(con: duckdb.DuckDBPyConnection) -> None:
    """Drop the temporary view; after a failed statement this fails too ("transaction is aborted"), and
    must not replace the statement's own error."""
    with contextlib.suppress(duckdb.Error):
        con.unregister("_mel_rows")


class Writer:
    """Writes inside one transaction; obtained from :meth:`Store.transaction`."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    def insert(self, table: str, rows: Sequence[dict]) -> None:
        """Insert rows (dicts; columns by name, missing ones NULL); rows whose primary key exists are skipped."""
        if not rows:
            return
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}")
        self.insert_arrow(table, pa.Table.from_pylist(list(rows)))

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        """:meth:`insert` for data already in Arrow form (skips the dict -> Arrow conversion)."""
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}")
        if data.num_rows == 0:
            return
        self.con.register("_mel_rows", data)
        try:
            if self._anti_join_ok(table, data):
                # Same result as INSERT OR IGNORE when the batch's keys are distinct, 3x faster on large batches.
                using = ", ".join(PRIMARY_KEYS[table])
                self.con.execute(f"INSERT INTO {table} BY NAME SELECT r.* FROM _mel_rows r "
                                 f"ANTI JOIN {table} USING ({using})")
            else:
                self.con.execute(f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM _mel_rows")
        finally:
            _unregister(self.con)

    def _anti_join_ok(self, table: str, data: pa.Table) -> bool:
        key = PRIMARY_KEYS[table]
        if not key or any(c not in data.column_names or not any(
                f(data.schema.field(c).type) for f in _ARROW_KEY_TYPES.get(t, ())) for c, t in key.items()):
            return False
        distinct = (pc.count_distinct(data[next(iter(key))], mode="all").as_py() if len(key) == 1
                    else data.group_by(list(key)).aggregate([]).num_rows)
        if distinct != data.num_rows:
            return False  # duplicates inside the batch: OR IGNORE keeps the first, a plain INSERT would fail
        size = self.con.execute("SELECT estimated_size FROM duckdb_tables() WHERE table_name = ? AND "
                                "database_name = current_database() AND schema_name = current_schema()",
                                [table]).fetchall()
        return not size or data.num_rows >= _ANTI_JOIN_MIN_FRACTION * size[0][0]

    def update(self, table: str, key: str, rows: Sequence[dict]) -> None:
        """Set the given columns of existing rows, matched on `key` (idempotent). Rows may set different
        columns: each row sets only its own (one UPDATE per set of columns)."""
        by_columns: dict[tuple[str, ...], list[dict]] = {}
        for row in rows:
            by_columns.setdefault(tuple(c for c in row if c != key), []).append(row)
        for cols, group in by_columns.items():
            self.con.register("_mel_rows", pa.Table.from_pylist(group))
            try:
                sets = ", ".join(f"{c} = r.{c}" for c in cols)
                self.con.execute(f"UPDATE {table} SET {sets} FROM _mel_rows r WHERE {table}.{key} = r.{key}")
            finally:
                _unregister(self.con)

    def execute(self, sql: str, params: Sequence | None = None) -> None:
        self.con.execute(sql, params or [])


def _add_missing_columns(w: Writer, table: str, ddl: str) -> None:
    """Columns added to a table's schema since an existing file was created (as NULL in old rows)."""
    have = {r[0] for r in w.con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND "
                                        "database_name = current_database()", [table]).fetchall()}
    for line in ddl.strip().splitlines():
        name, sql_type = line.strip().rstrip(",").split()[:2]
        if name != "PRIMARY" and name not in have:
            w.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")


class _SharedConnection:
    """The process's read-write connection to one file: opened on demand, closed after `idle_s` unused.

    Opening a DuckDB file costs ~30 ms here (a new database instance, even for an empty file), and a
    stage's bookkeeping is a burst of reads and writes: sharing one connection across the burst makes
    it one open instead of four or five. Closing it when idle gives the lock back between bursts, so
    a reader in another process gets in while the campaign generates or trains.
    """

    def __init__(self, path: Path, idle_s: float):
        self.path, self.idle_s = path, idle_s
        self.lock = threading.RLock()  # DuckDB connections are not for concurrent use: one user at a time
        self.con: duckdb.DuckDBPyConnection | None = None
        self.uses = 0

    @contextlib.contextmanager
    def use(self, wait_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.lock:
            if self.con is None:
                self.con = _connect(self.path, read_only=False, wait_s=wait_s)
            self.uses += 1
            try:
                yield self.con
            finally:
                timer = threading.Timer(self.idle_s, self._close_if_unused_since, args=(self.uses,))
                timer.daemon = True
                timer.start()

    def _close_if_unused_since(self, use: int) -> None:
        with self.lock:
            if self.uses == use and self.con is not None:
                self.con.close()
                self.con = None

    def close(self) -> None:
        with self.lock:
            if self.con is not None:
                self.con.close()
                self.con = None


_SHARED: dict[Path, _SharedConnection] = {}
_SHARED_LOCK = threading.Lock()


def _shared(path: Path, idle_s: float) -> _SharedConnection:
    key = path.resolve()
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = _SharedConnection(key, idle_s)
        return _SHARED[key]


def release_connections() -> None:
    """Close this process's shared connections now (also at exit: the idle timer may not have fired)."""
    with _SHARED_LOCK:
        shared = list(_SHARED.values())
    for s in shared:
        s.close()


atexit.register(release_connections)


_VERIFIED: set[Path] = set()  # files this process checked (mel store, readable whole) before writing to them
_VERIFIED_LOCK = threading.Lock()


class Store:
    """The writer's handle on one DuckDB file (cheap to construct after the first time per process).

    Reads and writes go through the process's shared connection to the file (:class:`_SharedConnection`),
    held during bursts and released when idle, so another writer process (``mel eval`` adding evaluations)
    can get in between. An existing file is first checked to be a mel store that reads whole; a new one is
    created with the schema, and older ones gain the columns and views added since. Other processes read
    the published snapshot (:meth:`publish`, :class:`StoreReader`).
    """

    IDLE_RELEASE_S = 0.1

    def __init__(self, path: str | Path, lock_wait_s: float = 60.0):
        self.path = Path(path)
        self.lock_wait_s = lock_wait_s
        if self.path.exists():
            self._verify_existing()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.transaction() as w:
                for name, cols in TABLES.items():
                    w.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
                    _add_missing_columns(w, name, cols)
                for name, sql in VIEWS.items():
                    w.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")
                w.insert("meta", [{"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                  {"key": "format", "value": STORE_FORMAT},
                                  {"key": "epoch", "value": uuid.uuid4().hex}])
        except duckdb.IOException as e:
            raise _open_error(self.path, e) from e
        if not snapshot_path(self.path).exists():
            self.publish()

    def _verify_existing(self) -> None:
        """ForeignStore / CorruptStore before anything is written (once per process and file): checked on a
        read-only connection, since opening a file for writing is already a way of changing it."""
        key = self.path.resolve()
        with _VERIFIED_LOCK:
            if key in _VERIFIED:
                return
            if _shared(self.path, self.IDLE_RELEASE_S).con is None:
                verify_store(self.path, self.lock_wait_s)
            _VERIFIED.add(key)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with _shared(self.path, self.IDLE_RELEASE_S).use(self.lock_wait_s) as con:
            yield con

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Writer]:
        """All writes inside commit together or not at all."""
        with self._connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield Writer(con)
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def publish(self) -> Path:
        """Publish the committed state for readers: CHECKPOINT, copy the file, rename the copy over the
        snapshot. Holding the connection keeps every other writer out while the bytes are copied; a reader
        that has the previous snapshot open keeps reading it (a rename replaces the name, not the file)."""
        snap = snapshot_path(self.path)
        with self._connection() as con:
            con.execute("CHECKPOINT")
            copy_file_atomically(self.path, snap)
        return snap

    def insert(self, table: str, rows: Sequence[dict]) -> None:
        with self.transaction() as w:
            w.insert(table, rows)

    def update(self, table: str, key: str, rows: Sequence[dict]) -> None:
        with self.transaction() as w:
            w.update(table, key, rows)

    def execute(self, sql: str, params: Sequence | None = None) -> None:
        with self.transaction() as w:
            w.execute(sql, params)

    @property
    def epoch(self) -> str:
        """A random id written when the file was created: deleting the file invalidates caches."""
        return self.query("SELECT value FROM meta WHERE key = 'epoch'")[0]["value"]

    def query(self, sql: str, params: Sequence | None = None) -> list[dict]:
        """Rows as dicts (the writer's own reads: the live file, not the snapshot)."""
        with self._connection() as con:
            return _rows(con.execute(sql, params or []))

    def counts(self) -> dict[str, int]:
        return {t: self.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


def _rows(cur) -> list[dict]:
    cols = [d[0] for d in cur.description] if cur.description else []
    return [dict(zip(cols, row)) for row in cur.fetchall()]


class StoreReader:
    """A reader's handle: the store's published snapshot (or, for a file that has none, the file itself),
    opened read-only with READER_SETTINGS. It never creates, migrates or locks anything a writer needs.

    `path` is the store (``RUN/mel.duckdb``) or its run directory. Use as a context manager, or close().
    """

    def __init__(self, path: str | Path, lock_wait_s: float = 10.0):
        p = Path(path)
        self.path = p / "mel.duckdb" if p.is_dir() else p
        if not self.path.is_file():
            raise MissingStore(f"no store at {self.path}")
        snap = snapshot_path(self.path)
        self.source = snap if snap.is_file() else self.path  # stores written before snapshots existed
        self.con = _checked_connection(self.source, lock_wait_s, scan=False)

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def query(self, sql: str, params: Sequence | None = None) -> list[dict]:
        """Rows as dicts. The connection refuses writes and file access whatever `sql` is."""
        return _rows(self.con.execute(sql, params or []))

    def query_user(self, sql: str) -> tuple[list[str], list[tuple]]:
        """A user's SQL: one SELECT-like statement (:func:`check_read_only`), then the locked connection."""
        check_read_only(sql)
        cur = self.con.execute(sql)
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()

    def query_user_arrow(self, sql: str) -> pa.Table:
        """:meth:`query_user` as an Arrow table: the column types DuckDB has (lists, timestamps, decimals), for
        a file the caller writes (this connection cannot write one)."""
        check_read_only(sql)
        return self.con.sql(sql).to_arrow_table()

    def query_batches(self, sql: str, params: Sequence | None = None,
                      batch_rows: int = 65536) -> pa.RecordBatchReader:
        """Rows as a stream of Arrow record batches: an export of a long campaign never holds it all in memory."""
        return self.con.sql(sql, params=list(params or [])).to_arrow_reader(batch_rows)

    def counts(self) -> dict[str, int]:
        return {t: self.query(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in TABLES}


def open_reader(path: str | Path, lock_wait_s: float = 10.0) -> StoreReader:
    """The Python read API: ``with open_reader("runs/tiny-demo") as r: r.query("SELECT ...")``."""
    return StoreReader(path, lock_wait_s)


_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:ANALY[SZ]E\s+)?", re.IGNORECASE)
_READ_ONLY_HELP = "a reader runs one SELECT (or DESCRIBE, SHOW, SUMMARIZE, or EXPLAIN of one)"


def check_read_only(sql: str) -> None:
    """The second layer of a reader's guarantee: exactly one statement, and a SELECT-like one (EXPLAIN
    [ANALYZE] only of a SELECT: EXPLAIN ANALYZE runs what it explains). The first layer is the connection."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ReadOnlyViolation(f"query refused: DuckDB cannot parse it ({str(e).splitlines()[0]})") from e
    if not statements:
        raise ReadOnlyViolation(f"empty query: {_READ_ONLY_HELP}")
    if len(statements) > 1:
        raise ReadOnlyViolation(f"{len(statements)} statements refused: {_READ_ONLY_HELP}")
    kind = str(statements[0].type).split(".")[-1]
    if kind == "EXPLAIN":
        inner = duckdb.extract_statements(_EXPLAIN.sub("", statements[0].query, count=1))
        inner_kind = str(inner[0].type).split(".")[-1] if len(inner) == 1 else "MULTI"
        if inner_kind != "SELECT":
            raise ReadOnlyViolation(f"EXPLAIN of {_verb(inner[0].query) if len(inner) == 1 else 'several statements'}"
                                    f" refused: {_READ_ONLY_HELP}")
    elif kind != "SELECT":
        raise ReadOnlyViolation(f"{_verb(statements[0].query)} statement refused: {_READ_ONLY_HELP}")


def _verb(statement: str) -> str:
    """The statement's own first word (INSTALL, RESET, CHECKPOINT): DuckDB's types lump them (LOAD, SET, CALL)."""
    words = statement.split()
    return words[0].upper() if words else "empty"
