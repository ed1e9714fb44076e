"""`mel runs`: every run under a root directory, what state it is in, and how far it got.

A run's status comes from two witnesses, because neither alone is enough. The run lock (mel_core.run.lock)
says whether a live process holds the directory now: only the kernel knows that, the store cannot (a killed
process leaves its last stage execution `running` forever). The `stage_runs` records say how the last
process ended: an execution left `running` or `interrupted` (its process died, or was stopped with Ctrl-C),
a last execution that `failed`, or the last step's update committed. So, in this order:

- ``running``: a live process holds the run lock (the directory's most recently active run, when the store
  holds several runs of one name);
- ``interrupted``: nobody holds the lock and an execution was left `running`, or the last one was
  `interrupted` or stopped by Ctrl-C — or nothing failed but the run stopped before its last step;
- ``failed``: the last execution failed;
- ``finished``: the update of the config's last step (``run.steps``) committed.

Everything here reads: the published snapshot through StoreReader, and the lock without taking it.
Runs copied into a fork's store as lineage references (``runs.copied_from``) are never listed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mel_core.errors import PermanentError
from mel_core.run import lock
from mel_core.store import run_reads
from mel_core.store.database import DB_FILE, StoreError
from mel_core.store.reader import StoreReader

STATUSES = ("running", "interrupted", "failed", "finished")
NONE = "-"


class RunsError(PermanentError, ValueError):
    """A root that cannot be listed (bad input: exit 2)."""


@dataclass(frozen=True)
class RunSummary:
    """One line of `mel runs`."""
    name: str
    run_id: str
    status: str
    steps: str          # "done/planned" (a fork plans run.steps - its fork step)
    last_checkpoint: str
    heldout: str        # greedy Pass@1 per dataset at the latest evaluated step
    parent: str         # the run this one was forked from, or "-"


def planned_steps(config_json: str | None) -> int | None:
    """`run.steps` of the run's recorded config (None if it cannot be read)."""
    try:
        steps = json.loads(config_json or "{}").get("run", {}).get("steps")
    except (ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def stopped_by_user(execution: dict) -> bool:
    """A stage stopped by Ctrl-C or SIGTERM is recorded `interrupted` (mel_core.run.executions); stores written
    before that recorded Ctrl-C as `failed` with the KeyboardInterrupt."""
    return (execution.get("error") or "").startswith("KeyboardInterrupt")


def run_status(lock_held: bool, executions: list[dict], planned: int | None, updated: list[int]) -> str:
    """One of STATUSES from the lock, the run's stage executions (oldest first) and its updated steps."""
    if lock_held:
        return "running"
    last = executions[-1] if executions else None
    if any(e["status"] == "running" for e in executions) or (
            last is not None and (last["status"] == "interrupted" or stopped_by_user(last))):
        return "interrupted"  # 'running' with no holder: its process died before the stage ended
    if last is not None and last["status"] == "failed":
        return "failed"
    if planned is not None and planned in updated:
        return "finished"
    return "interrupted"  # nothing failed and nothing runs, but the last step never committed


def heldout_text(rows: list[dict]) -> str:
    """'synthetic 0.475 @3' per dataset (greedy Pass@1 at the latest evaluated step), or '-'."""
    parts = [f"{r['dataset']} {r['pass_at_1']:.3f} @{r['step']}" for r in rows if r["pass_at_1"] is not None]
    return ", ".join(parts) or NONE


def checkpoint_text(ckpt: dict | None) -> str:
    return f"{ckpt['checkpoint_id']} (step {ckpt['step']})" if ckpt else NONE


def latest_activity(run: dict, executions: list[dict]):
    """When the run last did anything: its last stage start, else its registration."""
    return max([e["started_at"] for e in executions if e["started_at"] is not None] or [run["created_at"]])


def summarize_store(reader: StoreReader, lock_held: bool) -> list[RunSummary]:
    """A line per run recorded in one store; the lock counts for the run that was active last."""
    runs = run_reads.runs_with_parent(reader)
    executions = {r["run_id"]: run_reads.stage_executions(reader, r["run_id"]) for r in runs}
    active = max(runs, key=lambda r: latest_activity(r, executions[r["run_id"]]))["run_id"] if runs else None
    out = []
    for r in runs:
        planned, updated = planned_steps(r["config_json"]), run_reads.updated_steps(reader, r["run_id"])
        own_steps = None if planned is None else planned - (r["parent_step"] or 0)  # a fork runs STEP+1..run.steps
        out.append(RunSummary(
            name=r["name"] or NONE, run_id=r["run_id"],
            status=run_status(lock_held and r["run_id"] == active, executions[r["run_id"]], planned, updated),
            steps=f"{len(updated)}/{own_steps if own_steps is not None else '?'}",
            last_checkpoint=checkpoint_text(run_reads.last_checkpoint(reader, r["run_id"])),
            heldout=heldout_text(run_reads.last_heldout_accuracy(reader, r["run_id"])),
            parent=r["parent_run_id"] or NONE))
    return out


def run_dirs(root: Path) -> list[Path]:
    """The directories under `root` that hold a store or a run lock, by name."""
    if not root.is_dir():
        raise RunsError(f"--root {root}: no such directory (runs live under run.root_dir, default ./runs)")
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and ((d / DB_FILE).is_file() or (d / lock.LOCK_FILE).exists()))


def summarize_dir(run_dir: Path) -> tuple[list[RunSummary], str | None]:
    """The runs of one run directory, and why its store could not be read (None if it could)."""
    held = lock.holder(run_dir) is not None
    if not (run_dir / DB_FILE).is_file():  # a campaign that has not created its store yet
        status = "running" if held else "interrupted"
        return [RunSummary(run_dir.name, NONE, status, NONE, NONE, NONE, NONE)], None
    try:
        with StoreReader(run_dir / DB_FILE) as reader:
            return summarize_store(reader, held), None
    except StoreError as e:  # a foreign or damaged file is named, and the listing goes on
        return [RunSummary(run_dir.name, NONE, "unreadable", NONE, NONE, NONE, NONE)], str(e).splitlines()[0]


def list_runs(root: str | Path) -> tuple[list[RunSummary], list[str]]:
    """Every run under `root`, and one note per run directory that could not be read."""
    summaries, notes = [], []
    for d in run_dirs(Path(root)):
        found, problem = summarize_dir(d)
        summaries += found
        if problem:
            notes.append(f"{d}: {problem}")
    return summaries, notes


COLUMNS = ("name", "run id", "status", "steps", "last checkpoint", "held-out pass@1", "parent")


def as_rows(summaries: list[RunSummary]) -> list[tuple]:
    return [(s.name, s.run_id, s.status, s.steps, s.last_checkpoint, s.heldout, s.parent) for s in summaries]
