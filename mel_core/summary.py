"""Per-step summaries read back from the store: what `mel run` prints and the flows return."""

from __future__ import annotations

from mel_core.stage_names import STAGES
from mel_core.store import Store


def step_summary(store: Store, run_id: str, step: int) -> dict:
    """Metrics of one step plus seconds per stage (latest completed execution of each)."""
    m = {r["name"]: r["value"] for r in store.query(
        "SELECT name, value FROM metrics WHERE run_id = ? AND step = ?", [run_id, step])}
    secs = {r["stage"]: r["seconds"] for r in store.query(
        "SELECT stage, arg_max(seconds, finished_at) AS seconds FROM stage_runs "
        "WHERE run_id = ? AND step = ? AND status = 'completed' GROUP BY stage", [run_id, step])}
    return {"step": step, **m, "stage_seconds": secs}


def format_step(s: dict) -> str:
    g = lambda k, fmt="{:.0f}": fmt.format(s[k]) if s.get(k) is not None else "-"
    secs = s.get("stage_seconds", {})
    stage_part = " ".join(f"{st}={secs[st]:.1f}" for st in STAGES if st in secs)
    return (f"step {s['step']:>3} | reward {g('reward_mean', '{:.3f}')} | mixed {g('mixed_groups')}/{g('groups')} "
            f"| analyses {g('analyses')} | accepted {g('accepted')} | retention {g('retention_ratio', '{:.2f}')} "
            f"| nll {g('nll_loss', '{:.3f}')} | s/stage {stage_part}")
