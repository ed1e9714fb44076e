"""What the app and the study modules read about a run: its steps, stage executions, checkpoints, held-out
accuracy, accepted heuristics and replayed lessons (mel runs, the campaign's artifacts, mel eval, mel compare).
"""

from __future__ import annotations


def latest_accepted_heuristic(store, run_id: str) -> str | None:
    """The id of an accepted heuristic of the run's latest step that has one (what `mel run` suggests to trace)."""
    rows = store.query("SELECT heuristic_id FROM heuristics WHERE run_id = ? AND accepted ORDER BY step DESC, "
                       "heuristic_id LIMIT 1", [run_id])
    return rows[0]["heuristic_id"] if rows else None



def accepted_heuristics_of_step(store, run_id: str, step: int) -> list[dict]:
    return store.query("SELECT heuristic_id, text, analysis_id FROM heuristics WHERE run_id = ? AND step = ? AND accepted "
                       "ORDER BY heuristic_id", [run_id, step])



def evaluation_results(store, run_id: str, checkpoint_id: str, datasets: list[str]) -> list[dict]:
    return store.query("SELECT dataset, metric, k, temperature, value, num_problems, seconds FROM evals WHERE run_id = ? "
                       "AND checkpoint_id = ? AND list_contains(?, dataset) ORDER BY dataset, temperature, metric",
                       [run_id, checkpoint_id, datasets])



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
    from mel_core.store.lineage import _located
    rows = _located(reader, rows)
    return rows[0] if rows else None



def last_heldout_accuracy(reader, run_id: str) -> list[dict]:
    """Greedy Pass@1 per dataset at the latest evaluated step (the heldout_accuracy view)."""
    return reader.query("SELECT dataset, step, pass_at_1 FROM heldout_accuracy WHERE run_id = ? AND step = "
                        "(SELECT max(step) FROM heldout_accuracy WHERE run_id = ?) ORDER BY dataset",
                        [run_id, run_id])


def step_metrics(store, run_id: str, step: int) -> dict[str, float]:
    """name -> value of every metric the stages wrote for the step."""
    return {r["name"]: r["value"] for r in store.query(
        "SELECT name, value FROM metrics WHERE run_id = ? AND step = ?", [run_id, step])}


def stage_seconds_of_step(store, run_id: str, step: int) -> dict[str, float]:
    """stage -> seconds of its latest completed execution at the step."""
    return {r["stage"]: r["seconds"] for r in store.query(
        "SELECT stage, arg_max(seconds, finished_at) AS seconds FROM stage_runs "
        "WHERE run_id = ? AND step = ? AND status = 'completed' GROUP BY stage", [run_id, step])}


def metrics_by_step(store, run_id: str) -> list[dict]:
    """One row per step: {step, name: value, ...} of every metric the run's stages wrote, by step."""
    rows: dict[int, dict] = {}
    for r in store.query("SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step", [run_id]):
        rows.setdefault(r["step"], {"step": r["step"]})[r["name"]] = r["value"]
    return [rows[s] for s in sorted(rows)]


def stage_timings(store, run_id: str) -> list[dict]:
    """Seconds per (step, stage), summed over completed executions (the stage_timings view)."""
    return store.query("SELECT step, stage, seconds, executions FROM stage_timings WHERE run_id = ? "
                       "ORDER BY step, stage", [run_id])


def evaluation_curves(store, run_id: str) -> list[dict]:
    """Held-out results of the run's checkpoints, averaged per (dataset, metric, k, temperature, step); [] when the
    store has no evals table (older stores) or it holds none."""
    has = store.query("SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'evals' "
                      "AND database_name = current_database()")[0]["n"]
    if not has:
        return []
    return store.query(
        "SELECT e.dataset, e.metric, e.k, e.temperature, coalesce(e.step, c.step) AS step, avg(e.value) AS value "
        "FROM evals e LEFT JOIN checkpoints c USING (checkpoint_id) "
        "WHERE (e.run_id = ? OR c.run_id = ?) AND e.value IS NOT NULL "
        "GROUP BY ALL ORDER BY dataset, metric, temperature, k, step", [run_id, run_id])


def other_run_ids(store, run_id: str) -> list[str]:
    return [r["run_id"] for r in store.query("SELECT run_id FROM runs WHERE run_id <> ?", [run_id])]


def run_names(store) -> dict[str, str]:
    """run_id -> name of every run the store holds (lineage references included)."""
    return {r["run_id"]: r["name"] for r in store.query("SELECT run_id, name FROM runs")}


def checkpoint_step(store, checkpoint_id: str) -> int | None:
    rows = store.query("SELECT step FROM checkpoints WHERE checkpoint_id = ? LIMIT 1", [checkpoint_id])
    return rows[0]["step"] if rows else None


def greedy_eval_rewards(store, run_id: str) -> list[dict]:
    """(dataset, step, problem_id, reward) of every greedy evaluation sample of the run."""
    return store.query("SELECT dataset, step, problem_id, reward FROM eval_samples WHERE run_id = ? AND greedy",
                       [run_id])


def metric_steps(store, run_id: str) -> list[int]:
    return [s["step"] for s in store.query("SELECT DISTINCT step FROM metrics WHERE run_id = ? ORDER BY step",
                                           [run_id])]


def heldout_accuracy(store, run_id: str) -> list[dict]:
    """Every evaluation of the run by dataset and step (the heldout_accuracy view)."""
    return store.query("SELECT dataset, step, pass_at_1, avg_at_k, pass_at_k, k, num_problems "
                       "FROM heldout_accuracy WHERE run_id = ? ORDER BY dataset, step", [run_id])


def step_problems(store, run_id: str) -> list[dict]:
    """(step, position, problem_id) of every prompt the run trained on."""
    return store.query("SELECT step, position, problem_id FROM prompts WHERE run_id = ? ORDER BY step, position",
                       [run_id])


def run_with_id(store, run_id: str) -> bool:
    return bool(store.query("SELECT run_id FROM runs WHERE run_id = ?", [run_id]))


def runs_by_creation(store) -> list[dict]:
    """Every runs row, oldest first."""
    return store.query("SELECT * FROM runs ORDER BY created_at")


def analysis_to_show(store, run_id: str) -> dict | None:
    """One analysis of the run to show whole: the latest accepted one, else the latest that reached the replay,
    else the latest parsed one, else the latest of all; with its problem, its heuristics and its replays."""
    rows = store.query(
        "SELECT a.analysis_id, a.step, a.status, a.reject_reason, a.parsed, a.raw_text, a.finish_reason, "
        "a.bifurcation_step, pr.question, pr.answer, "
        "(SELECT list(h.text ORDER BY h.position) FROM heuristics h WHERE h.analysis_id = a.analysis_id) AS heuristics, "
        "(SELECT list({'reward': r.reward, 'verify_reason': r.verify_reason, 'extracted_answer': r.extracted_answer, "
        "'text': r.text} ORDER BY r.replay_index) FROM replays r WHERE r.analysis_id = a.analysis_id "
        "AND r.kind = 'self') AS replays "
        "FROM analyses a JOIN pairs pa USING (pair_id) JOIN prompts pr ON pr.prompt_id = pa.prompt_id "
        "WHERE a.run_id = ? AND a.raw_text IS NOT NULL ORDER BY "
        "a.status = 'accepted' DESC, a.reject_reason IN ('replay_failed', 'transfer_failed') DESC, a.parsed DESC, "
        "a.step DESC, a.analysis_id LIMIT 1", [run_id])
    return rows[0] if rows else None
