"""Lineage reads: where a heuristic came from and which checkpoints learned it, a checkpoint's history across
forks, and what a fork copies from its parent's store so that lineage crosses into its own file.

The recursive walk over ``parent_checkpoint_id`` is written out here rather than read from the
``checkpoint_history`` views, so it reads stores written before those views existed.
"""

from __future__ import annotations

from pathlib import Path

from mel_core.model.checkpoints import OPTIMIZER_FILE, FileDigest, resolve_checkpoint_path


def _located(store, rows: list[dict]) -> list[dict]:
    """Checkpoint rows with 'path' where the directory is now: recorded paths are relative to the run directory (the
    directory the store file is in) or, in older stores, absolute (mel_core.model.checkpoints.resolve_checkpoint_path)."""
    db = getattr(store, "path", None)
    if db is None:
        return rows
    run_dir = Path(db).absolute().parent
    return [{**r, "path": str(resolve_checkpoint_path(r["path"], run_dir))} if r.get("path") else r for r in rows]


def heuristic_lineage(store, heuristic_id: str) -> dict | None:
    """Where a heuristic came from and which checkpoint learned it (the heuristic_lineage view)."""
    rows = store.query("SELECT * FROM heuristic_lineage WHERE heuristic_id = ?", [heuristic_id])
    return rows[0] if rows else None



def checkpoint(store, checkpoint_id: str) -> dict | None:
    rows = _located(store, store.query("SELECT * FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id]))
    return rows[0] if rows else None



def checkpoint_files(store, checkpoint_id: str) -> list[FileDigest]:
    """Every file of the checkpoint as recorded when it was written ([] for one a run did not write, or a store from
    before files were recorded)."""
    if not _has_column(store, "checkpoint_files", "digest"):
        return []
    rows = store.query("SELECT file, size, digest, algorithm FROM checkpoint_files WHERE checkpoint_id = ? "
                       f"AND {_not_pruned(store, 'checkpoint_files')} ORDER BY file", [checkpoint_id])
    return [FileDigest(**r) for r in rows]  # a file retention deleted (the optimizer state) is no longer expected



def checkpoints_with_files(store) -> list[dict]:
    """Every checkpoint of the store (step, id, path, pruned_at; a fork's copied ones too) with its recorded files
    under 'files' (a list of FileDigest, empty when none were recorded) and those retention deleted since under
    'pruned_files' (file names), by step."""
    rows = _located(store, store.query(f"SELECT checkpoint_id, run_id, step, path, {_pruned_at(store, 'checkpoints')} "
                                       "FROM checkpoints ORDER BY step, checkpoint_id"))
    files: dict[str, list[FileDigest]] = {}
    gone: dict[str, list[str]] = {}
    if _has_column(store, "checkpoint_files", "digest"):
        for r in store.query(f"SELECT checkpoint_id, file, size, digest, algorithm, "
                             f"{_pruned_at(store, 'checkpoint_files')} FROM checkpoint_files "
                             "ORDER BY checkpoint_id, file"):
            cid, pruned = r.pop("checkpoint_id"), r.pop("pruned_at")
            if pruned is None:
                files.setdefault(cid, []).append(FileDigest(**r))
            else:
                gone.setdefault(cid, []).append(r["file"])
    return [{**r, "files": files.get(r["checkpoint_id"], []), "pruned_files": gone.get(r["checkpoint_id"], [])}
            for r in rows]



def checkpoint_heuristics(store, checkpoint_id: str) -> list[dict]:
    """Every heuristic the checkpoint internalized (the checkpoint_heuristics view)."""
    return store.query("SELECT * FROM checkpoint_heuristics WHERE checkpoint_id = ? ORDER BY heuristic_step, "
                       "heuristic_id", [checkpoint_id])



def find_checkpoint(store, id_or_path: str, path: str) -> dict | None:
    """A checkpoint by id or by directory (`path`, absolute: compared with where each recorded checkpoint is now, so
    a moved or copied run finds its own), with its run's config (to evaluate it with the run's own settings)."""
    rows = _located(store, store.query(f"SELECT c.checkpoint_id, c.path, c.step, c.run_id, r.config_json, "
                                       f"{_pruned_at(store, 'checkpoints', 'c')} "
                                       "FROM checkpoints c LEFT JOIN runs r USING (run_id) ORDER BY c.step"))
    return next((r for r in rows if r["checkpoint_id"] == id_or_path), None) or \
        next((r for r in rows if r["path"] == str(path)), None)


# The chain from one checkpoint up to its base, walking parent_checkpoint_id: only the tables that existed
# before forks did, so it reads older stores as well (the checkpoint_history view is created by newer writers).
_CHAIN = ("WITH RECURSIVE chain(checkpoint_id, depth) AS (SELECT CAST(? AS VARCHAR), 0 UNION ALL "
          "SELECT c.parent_checkpoint_id, ch.depth + 1 FROM chain ch JOIN checkpoints c USING (checkpoint_id) "
          "WHERE c.parent_checkpoint_id IS NOT NULL) ")



def checkpoint_chain(store, checkpoint_id: str) -> list[dict]:
    """The checkpoint and every one before it (its parent, the parent's parent, ... the base), base first, across
    forks; [] when the store does not know the checkpoint."""
    return _located(store, store.query(_CHAIN + "SELECT c.*, chain.depth FROM chain JOIN checkpoints c "
                                                "USING (checkpoint_id) ORDER BY chain.depth DESC", [checkpoint_id]))



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
    return _located(store, store.query(f"SELECT c.* FROM checkpoints c WHERE c.run_id = ? OR c.checkpoint_id IN "
                                       f"(SELECT checkpoint_in FROM updates WHERE run_id = ?) {started_from} "
                                       f"ORDER BY c.step", [run_id, run_id] + ([run_id] if started_from else [])))



def _has_column(store, table: str, column: str) -> bool:
    return bool(store.query("SELECT 1 FROM duckdb_columns() WHERE table_name = ? AND column_name = ? AND "
                            "database_name = current_database()", [table, column]))



def _pruned_at(store, table: str, alias: str = "") -> str:
    """The select expression of `table`'s pruned_at: NULL in stores written before checkpoint retention."""
    return f"{alias + '.' if alias else ''}pruned_at" if _has_column(store, table, "pruned_at") else \
        "CAST(NULL AS TIMESTAMP) AS pruned_at"


def _not_pruned(store, table: str) -> str:
    return "pruned_at IS NULL" if _has_column(store, table, "pruned_at") else "true"


# ------------------------------------------------------------------------------- checkpoint retention

def own_checkpoints(store, run_id: str) -> list[dict]:
    """The checkpoints run `run_id` wrote (not its base, not a fork's parent: those have no update of this run),
    committed, by step: checkpoint_id, step, path (as recorded), pruned_at, and whether its optimizer state was
    pruned ('optimizer_pruned'). What retention (mel_core.run.retention) chooses from."""
    return store.query("SELECT c.checkpoint_id, c.step, c.path, c.pruned_at, "
                       "EXISTS (SELECT 1 FROM checkpoint_files f WHERE f.checkpoint_id = c.checkpoint_id "
                       "        AND f.file = ? AND f.pruned_at IS NOT NULL) AS optimizer_pruned "
                       "FROM checkpoints c JOIN updates u ON u.checkpoint_out = c.checkpoint_id AND u.run_id = c.run_id "
                       "WHERE c.run_id = ? ORDER BY c.step", [OPTIMIZER_FILE, run_id])


def mark_pruned(w, checkpoint_id: str, at) -> None:
    """The checkpoint's directory is (being) deleted by retention; `at` None: it was kept after all (pinned)."""
    w.execute("UPDATE checkpoints SET pruned_at = ? WHERE checkpoint_id = ?", [at, checkpoint_id])


def mark_file_pruned(w, checkpoint_id: str, file: str, at) -> None:
    w.execute("UPDATE checkpoint_files SET pruned_at = ? WHERE checkpoint_id = ? AND file = ?",
              [at, checkpoint_id, file])


def _rows_where_in(store, table: str, column: str, values) -> list[dict]:
    values = sorted({v for v in values if v is not None})
    if not values:
        return []
    return store.query(f"SELECT * FROM {table} WHERE list_contains(?, {column})", [values])



def lineage_references(store, checkpoint_id: str, source: str) -> dict[str, list[dict]]:
    """What a fork from `checkpoint_id` copies from its parent's store (`store`, a reader of its snapshot) so
    that lineage crosses the fork inside the fork's own file: the checkpoint chain to the base, the updates
    that wrote it, what they internalized, and each internalized heuristic's lineage (analysis, pair, both
    rollouts, prompt), the verifiers of those rollouts, the chain's recorded files and the runs all of it belongs to, marked
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
    files = (_rows_where_in(store, "checkpoint_files", "checkpoint_id", [c["checkpoint_id"] for c in chain])
             if _has_column(store, "checkpoint_files", "digest") else [])  # so the fork checks its start's files
    run_ids = {r["run_id"] for rows in (chain, updates, heuristics, analyses, pairs, rollouts, prompts) for r in rows}
    runs = [{**r, "copied_from": r.get("copied_from") or source}
            for r in _rows_where_in(store, "runs", "run_id", run_ids)]
    chain = [{k: v for k, v in c.items() if k != "depth"} for c in chain]
    return {"runs": runs, "checkpoints": chain, "checkpoint_files": files, "updates": updates, "internalized": internalized,
            "heuristics": heuristics, "analyses": analyses, "pairs": pairs, "rollouts": rollouts, "prompts": prompts,
            "verifiers": verifiers}
