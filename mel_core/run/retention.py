"""Checkpoint retention (run.keep_checkpoints, run.keep_checkpoint_every) and pins.

A run that keeps every checkpoint keeps weights and AdamW state for every step: 13 MB a step for the tiny model,
~40 GB for a 4B one. With ``run.keep_checkpoints = N`` the campaign prunes after each step's checkpoint is
committed (:func:`prune`):

- **kept whole**: the newest checkpoint (weights and optimizer state: all a resume reads) and pinned ones;
- **kept, weights only**: the other N - 1 newest, and every ``run.keep_checkpoint_every``-th step;
- **pruned**: every other checkpoint this run wrote — its directory is deleted, its row stays and says when
  (``checkpoints.pruned_at``), and so do its update, the heuristics it internalized and its evaluations.

Never touched: checkpoints this run did not write under its own ``checkpoints/<hash>/`` (the base model, a fork's
parent's checkpoint), one still being written in the background (its rows are not committed yet, so it is not a
candidate), and the one the policy holds (the next step reads it).

**Pins** are files ``<run dir>/pins/<checkpoint id>.json``, written whole (temp file + rename): a fork writes one
into its parent's run directory for the checkpoint it starts from (a fork never writes its parent's store), and
``mel pin RUN@STEP`` writes one by hand (a checkpoint found with ``mel lineage``, kept for later). A pinned
checkpoint is kept as it is, optimizer state included when it still has it.

A fork can pin while its parent's campaign prunes. The pruner records the pruning, renames the directory aside
(atomic), then reads the pins again: a pin written before that second read brings the directory back and clears
the record; after it, the fork finds no directory (it pins first, then checks). A crash between the record and
the deletion leaves a recorded pruning whose files the next pass deletes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mel_core.atomic_files import write_file_atomically
from mel_core.ids import now
from mel_core.model.checkpoints import OPTIMIZER_FILE, resolve_checkpoint_path
from mel_core.store import lineage

if TYPE_CHECKING:  # the runtime brings torch: pins and the plan are read by light commands (mel pin, --fork's errors)
    from mel_core.step.runtime import Runtime

PINS_DIR = "pins"
_ASIDE = ".pruning"  # a directory renamed aside for deletion: <step dir>.pruning


# ----------------------------------------------------------------------------------------------------- pins

def pin_path(run_dir: str | Path, checkpoint_id: str) -> Path:
    return Path(run_dir) / PINS_DIR / f"{checkpoint_id}.json"


def pin(run_dir: str | Path, checkpoint_id: str, step: int, by: str) -> Path:
    """Pin `checkpoint_id` (of the run in `run_dir`, at `step`) against retention; `by` says who (kept in the file).
    Idempotent: a second pin replaces the first."""
    record = {"checkpoint_id": checkpoint_id, "step": step, "by": by, "at": now().isoformat(timespec="seconds")}
    return write_file_atomically(pin_path(run_dir, checkpoint_id),
                                 lambda tmp: tmp.write_text(json.dumps(record, sort_keys=True) + "\n"))


def unpin(run_dir: str | Path, checkpoint_id: str) -> bool:
    """Remove the pin of `checkpoint_id`; whether there was one."""
    p = pin_path(run_dir, checkpoint_id)
    existed = p.is_file()
    p.unlink(missing_ok=True)
    return existed


def pins(run_dir: str | Path) -> dict[str, dict]:
    """{checkpoint id: its pin record} of the run in `run_dir` (a pin that does not read whole still pins)."""
    out = {}
    for p in sorted((Path(run_dir) / PINS_DIR).glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            out[p.stem] = {"checkpoint_id": p.stem}
    return out


def is_pinned(run_dir: str | Path, checkpoint_id: str) -> bool:
    return pin_path(run_dir, checkpoint_id).is_file()


def step_ranges(steps) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    steps = sorted(steps)
    out, start = [], None
    for i, s in enumerate(steps):
        start = s if start is None else start
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(out)


# ----------------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """What retention does to a run's checkpoints now: ids to delete whole, ids to lose their optimizer state."""
    prune: tuple[str, ...]
    drop_optimizer: tuple[str, ...]


def plan(checkpoints: list[dict], keep_last: int, keep_every: int, protected: set[str]) -> Plan:
    """`checkpoints`: a run's own committed ones (checkpoint_id, step, pruned_at, optimizer_pruned). Keeps the
    newest `keep_last`, every `keep_every`-th step and the `protected` ids (pinned, in use); of the kept, only the
    newest and the protected keep their optimizer state. keep_last 0: nothing changes."""
    live = sorted((c for c in checkpoints if c["pruned_at"] is None), key=lambda c: c["step"])
    if keep_last <= 0 or not live:
        return Plan((), ())
    newest = {c["checkpoint_id"] for c in live[-keep_last:]}
    every = {c["checkpoint_id"] for c in live if keep_every and c["step"] % keep_every == 0}
    kept = newest | every | protected
    whole = {live[-1]["checkpoint_id"]} | protected
    return Plan(tuple(c["checkpoint_id"] for c in live if c["checkpoint_id"] not in kept),
                tuple(c["checkpoint_id"] for c in live if c["checkpoint_id"] in kept - whole
                      and not c["optimizer_pruned"]))


# --------------------------------------------------------------------------------------------------- pruning

@dataclass(frozen=True)
class Pruned:
    """What one :func:`prune` pass did: steps whose checkpoint it deleted, steps whose optimizer state it deleted."""
    steps: tuple[int, ...] = ()
    optimizer_steps: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.steps or self.optimizer_steps)

    def line(self, cfg) -> str:
        parts = ([f"the checkpoints of step{'s' if len(self.steps) > 1 else ''} {step_ranges(self.steps)}"]
                 if self.steps else [])
        if self.optimizer_steps:
            parts.append(f"the optimizer state of step{'s' if len(self.optimizer_steps) > 1 else ''} "
                         f"{step_ranges(self.optimizer_steps)}")
        every = f", run.keep_checkpoint_every={cfg.run.keep_checkpoint_every}" if cfg.run.keep_checkpoint_every else ""
        return f"mel: pruned {' and '.join(parts)} (run.keep_checkpoints={cfg.run.keep_checkpoints}{every})"


def prune(rt: Runtime) -> Pruned:
    """Apply run.keep_checkpoints to this run's committed checkpoints, in the campaign process between steps (no
    stage is reading a checkpoint then; the one the next step reads is the newest, kept whole). Deletes what the
    store records as pruned and is still on disk (a pass a crash interrupted) too. Returns what it did."""
    cfg = rt.cfg.run
    if cfg.keep_checkpoints <= 0:
        return Pruned()
    own = [c for c in lineage.own_checkpoints(rt.store, rt.run_id) if _is_own_dir(rt, c["path"])]
    protected = set(pins(rt.run_dir)) | rt.checkpoints_in_use
    todo = plan(own, cfg.keep_checkpoints, cfg.keep_checkpoint_every, protected)
    by_id = {c["checkpoint_id"]: c for c in own}
    steps, optimizer_steps = [], []
    for cid in todo.prune:
        if _prune_dir(rt, by_id[cid]):
            steps.append(by_id[cid]["step"])
    for cid in todo.drop_optimizer:
        if _drop_optimizer(rt, by_id[cid]):
            optimizer_steps.append(by_id[cid]["step"])
    for c in own:  # recorded as pruned, still on disk: a pass that died between the record and the deletion
        if c["pruned_at"] is not None:
            _delete_leftovers(_dir(rt, c["path"]))
    if steps or optimizer_steps:
        rt.store.publish()  # readers (a fork, mel verify, mel eval) see the pruning
    return Pruned(tuple(steps), tuple(optimizer_steps))


def _dir(rt: Runtime, recorded: str) -> Path:
    return resolve_checkpoint_path(recorded, rt.run_dir)


def _is_own_dir(rt: Runtime, recorded: str) -> bool:
    """A directory this run wrote under its own checkpoints/<hash>/: the only ones retention may delete."""
    return _dir(rt, recorded).parent == rt.checkpoint_dir


def _prune_dir(rt: Runtime, c: dict) -> bool:
    """Record the pruning, move the directory aside, read the pins again, then delete it — or, pinned meanwhile,
    put it back and clear the record. Whether it was pruned."""
    path = _dir(rt, c["path"])
    aside = path.with_name(path.name + _ASIDE)
    with rt.store.transaction() as w:
        lineage.mark_pruned(w, c["checkpoint_id"], now())
    if path.is_dir():
        os.rename(path, aside)
    if is_pinned(rt.run_dir, c["checkpoint_id"]):  # a fork pinned it between the plan and the rename
        if aside.is_dir():
            os.rename(aside, path)
        with rt.store.transaction() as w:
            lineage.mark_pruned(w, c["checkpoint_id"], None)
        return False
    _delete_leftovers(path)
    return True


def _drop_optimizer(rt: Runtime, c: dict) -> bool:
    """Delete a kept checkpoint's optimizer state (recorded first: mel verify then expects it gone)."""
    f = _dir(rt, c["path"]) / OPTIMIZER_FILE
    if not f.is_file():
        return False
    with rt.store.transaction() as w:
        lineage.mark_file_pruned(w, c["checkpoint_id"], OPTIMIZER_FILE, now())
    if is_pinned(rt.run_dir, c["checkpoint_id"]):
        with rt.store.transaction() as w:
            lineage.mark_file_pruned(w, c["checkpoint_id"], OPTIMIZER_FILE, None)
        return False
    f.unlink(missing_ok=True)
    return True


def _delete_leftovers(path: Path) -> None:
    for p in (path, path.with_name(path.name + _ASIDE)):
        if p.is_dir():
            shutil.rmtree(p)
