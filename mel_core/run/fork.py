"""Forking a campaign: a new run that starts from the checkpoint (and optimizer state) another run had after one
of its steps, with a changed config — `mel run --config FILE --fork RUN@STEP key=value ...` (a different λ, another
estimator, MEL switched off).

What a fork is (docs/DESIGN.md, "Forks"):

- **Identity.** The fork point is config: ``run.fork`` (parent run id, step, checkpoint id; where the checkpoint and
  the parent's store are on disk is not identity). So the fork's run id, checkpoint directory and cache keys differ
  from its parent's even when nothing else changed, and resuming a fork is running the same command again.
- **Step numbering continues the parent's.** A fork of step S runs steps S+1 .. run.steps: ``run.steps`` is the
  number of the last step, as in its parent, so a fork of step 2 of a 3-step run with ``run.steps=3`` trains one
  step, step 3, on the problems and seeds its parent's step 3 had — the counterfactual the fork is for.
- **Its own store.** A fork writes its own new run directory, never its parent's nor any other run's (the one file
  it writes there is a pin, ``pins/<checkpoint id>.json``, so the parent's checkpoint retention keeps the
  checkpoint the fork starts from: mel_core.run.retention): it is named
  ``<parent name>-fork<S>`` unless a ``run.name=`` override names it (the config file's run.name names the file's
  own run, the demo's say), and refused when that directory exists and does not hold this very fork (a resume).
  Every refusal comes before the run lock and registration: a refused fork creates nothing. The data of steps <= S
  is not copied.
- **Lineage crosses the fork by copying references.** When the fork registers, it copies from the parent's
  published snapshot the checkpoint chain up to the fork point and the lineage of every heuristic internalized on
  it (mel_core.store.lineage.lineage_references), marked ``runs.copied_from``. Its first update names the parent's
  checkpoint as ``parent_checkpoint_id``, so ``checkpoint_history`` and ``heuristic_lineage`` walk from the fork's
  last checkpoint into its parent's steps inside one file. Readers keep their rules: they never write, and never
  ATTACH another file (their connection cannot), so the rows a query needs must be in the file it reads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mel_core import config as config_mod
from mel_core.config import MelConfig
from mel_core.errors import PermanentError
from mel_core.model.checkpoints import DamagedCheckpoint, checkpoint_problem, verify_checkpoint
from mel_core.run import refs
from mel_core.run.retention import pin, step_ranges
from mel_core.store import lineage
from mel_core.store.reader import StoreReader

_log = logging.getLogger("mel")
# What a checkpoint's weights are weights of: a fork must keep them (a LoRA checkpoint holds adapters only, a tiny
# model's shape is its config).
MODEL_KEYS = ("model.name_or_path", "model.tiny.", "model.lora.")
# Keys a fork's config may differ in without it being a change worth printing: identity and locations.
_NOT_A_CHANGE = ("run.name", "run.fork.")


class ForkError(PermanentError, ValueError):
    """A fork that cannot start (no checkpoint at that step, checkpoint files gone, another model)."""


@dataclass(frozen=True)
class ForkPoint:
    """Where a fork starts: the parent run, its step, that step's checkpoint, and the parent's store and config."""
    run_id: str
    run_name: str
    step: int
    checkpoint_id: str
    checkpoint_path: str
    store: str
    config: dict

    def overrides(self) -> list[str]:
        """The run.fork section as key=value overrides (what `mel run --fork` adds to the user's)."""
        return [f"run.fork.run_id={self.run_id}", f"run.fork.step={self.step}",
                f"run.fork.checkpoint_id={self.checkpoint_id}", f"run.fork.checkpoint_path={self.checkpoint_path}",
                f"run.fork.store={self.store}"]


def parse_spec(spec: str, what: str = "--fork") -> tuple[str, int]:
    """'RUN@STEP' -> (RUN, STEP); the last '@' separates them (a path may hold one)."""
    run, sep, step = spec.rpartition("@")
    if not sep or not run or not step.isdigit():
        raise ForkError(f"{what}: expected RUN@STEP (a run directory, run name or run id, then a step number, e.g. "
                        f"tiny-demo@3), got {spec!r}")
    return run, int(step)


def step_checkpoint(spec: str, runs_root: str | Path, what: str = "--fork") -> tuple[refs.RunRef, dict, dict]:
    """(the run's store, its runs row, its checkpoint row) of 'RUN@STEP', read from the run's published snapshot;
    ForkError in one line when the run has no checkpoint at that step or retention pruned it. `what` names the
    asker in the message (--fork, mel pin)."""
    run, step = parse_spec(spec, what)
    ref = refs.resolve_run(run, runs_root)
    with StoreReader(ref.db) as reader:
        row = refs.pick_run(reader, ref)
        had = lineage.run_checkpoints(reader, row["run_id"])
    ckpt = next((c for c in had if c["step"] == step), None)
    steps = sorted({c["step"] for c in had})
    if ckpt is None:
        have = f"it has checkpoints at steps {step_ranges(steps)}" if steps else "it has no checkpoint yet"
        raise ForkError(f"{what} {spec}: run {row['name']} ({row['run_id']}) has no checkpoint at step {step}; {have}")
    if ckpt.get("pruned_at") is not None:
        kept = sorted({c["step"] for c in had if c.get("pruned_at") is None})
        raise ForkError(f"{what} {spec}: the checkpoint of step {step} ({ckpt['checkpoint_id']}) was pruned at "
                        f"{ckpt['pruned_at']:%Y-%m-%d %H:%M:%S} by run.keep_checkpoints: use a kept step "
                        f"({step_ranges(kept)}), or pin a step before it is pruned (mel pin RUN@STEP)")
    return ref, row, ckpt


def find_fork_point(spec: str, runs_root: str | Path) -> ForkPoint:
    """The run and checkpoint `spec` names, read from the run's published snapshot; ForkError in one line when
    the run has no checkpoint at that step, it was pruned, or its files are gone."""
    ref, row, ckpt = step_checkpoint(spec, runs_root)
    step = ckpt["step"]
    with StoreReader(ref.db) as reader:
        files = lineage.checkpoint_files(reader, ckpt["checkpoint_id"])
    problem = checkpoint_problem(ckpt["path"])
    if problem:
        raise ForkError(f"--fork {spec}: the checkpoint of step {step} ({ckpt['checkpoint_id']}) at {ckpt['path']} "
                        f"cannot be loaded: {problem}")
    try:  # its recorded files, checked now: a damaged checkpoint is refused before the fork creates anything
        verify_checkpoint(ckpt["checkpoint_id"], ckpt["path"], files)
    except DamagedCheckpoint as e:
        raise ForkError(f"--fork {spec}: {e}") from None
    return ForkPoint(row["run_id"], row["name"], step, ckpt["checkpoint_id"], str(Path(ckpt["path"]).resolve()),
                     str(ref.db.resolve()), json.loads(row["config_json"] or "{}"))


def pin_parent(cfg: MelConfig, check: bool = True) -> None:
    """Pin the checkpoint a fork starts from in its parent's run directory (mel_core.run.retention: the parent's
    retention then keeps it, optimizer state included), then (`check`: a fork that has not started yet) check it is
    still there: a parent campaign pruning meanwhile either sees the pin and keeps it, or has deleted it and the
    fork is refused in one line."""
    fork = cfg.run.fork
    parent_dir = Path(fork.store).parent
    try:
        pin(parent_dir, fork.checkpoint_id, fork.step,
                      by=f"fork {cfg.run.name} ({Path(cfg.run.root_dir).resolve() / cfg.run.name})")
    except OSError as e:  # a parent directory the fork may not write (another user's, read-only): no campaign prunes it
        _log.warning("could not pin the parent's checkpoint of step %d in %s (%s: %s): the parent's "
                     "run.keep_checkpoints could prune it", fork.step, parent_dir, type(e).__name__, e)
    if check and not Path(fork.checkpoint_path).is_dir():
        raise ForkError(f"run.fork.checkpoint_path: the parent's checkpoint of step {fork.step} "
                        f"({fork.checkpoint_id}) is gone from {fork.checkpoint_path}: pruned by its run's "
                        f"run.keep_checkpoints (or deleted) before the fork pinned it")


def default_name(point: ForkPoint) -> str:
    return f"{point.run_name}-fork{point.step}"


def fork_config(path: str | Path, overrides: list[str], point: ForkPoint) -> MelConfig:
    """The fork's config: FILE <- overrides <- run.fork. Its name is ``<parent>-fork<STEP>`` unless a ``run.name=``
    override names it (FILE's run.name names FILE's own run, e.g. the demo's, not the fork), and always when that
    name is its parent's. ForkError when it changes the model the checkpoint is of, or when its run directory
    exists and holds anything but this fork itself (resuming a fork is running the same command again)."""
    from mel_core.step.runtime import run_dir_of

    named = any(o.partition("=")[0].strip() == "run.name" for o in overrides)
    overrides = list(overrides) + point.overrides()
    cfg = config_mod.load(path, overrides if named else overrides + [f"run.name={default_name(point)}"])
    if run_dir_of(cfg) == Path(point.store).parent:
        cfg = config_mod.load(path, overrides + [f"run.name={default_name(point)}"])
    changed = [(k, old, new) for k, old, new in config_changes(point.config, config_mod.to_dict(cfg))
               if k.startswith(MODEL_KEYS)]
    if changed:
        k, old, new = changed[0]
        raise ForkError(f"--fork: a fork trains on from its parent's checkpoint, so it keeps its model: {k} is "
                        f"{old!r} in {point.run_name} and {new!r} here")
    _refuse_foreign_dir(cfg)
    return cfg


def _refuse_foreign_dir(cfg: MelConfig) -> None:
    """ForkError unless the fork's run directory is new, or is this fork's own (its store records the fork's run: a
    resume). Empty, or holding only a lock, counts as new: a fork stopped before it registered."""
    from mel_core.ids import make_id
    from mel_core.run.lock import LOCK_FILE
    from mel_core.step.runtime import run_dir_of
    from mel_core.store.database import DB_FILE

    run_dir = run_dir_of(cfg)
    if not run_dir.is_dir() or not {p.name for p in run_dir.iterdir()} - {LOCK_FILE}:
        return
    run_id = make_id("run", cfg.run.name, config_mod.config_hash(cfg))
    own = False
    if (run_dir / DB_FILE).is_file():
        try:
            with StoreReader(run_dir / DB_FILE) as reader:
                own = bool(reader.query("SELECT 1 FROM runs WHERE run_id = ?", [run_id]))
        except Exception:
            own = False
    if not own:
        raise ForkError(f"--fork: the fork's run directory {run_dir} already exists and holds another run; a fork "
                        f"never writes into another run's directory: name it with run.name=NEW_NAME")


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def config_changes(parent: dict, child: dict) -> list[tuple[str, object, object]]:
    """(dotted key, parent's value, child's value) of every result-changing key the child changes (keys one of
    them lacks — a config written before the key existed — are left out)."""
    neutral = tuple(f"{k}." for k in config_mod.RESULT_NEUTRAL_KEYS) + config_mod.RESULT_NEUTRAL_KEYS
    a, b = _flatten(parent), _flatten(child)
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys())
            if a[k] != b[k] and not k.startswith(neutral) and not k.startswith(_NOT_A_CHANGE)]


def references(cfg: MelConfig) -> dict[str, list[dict]]:
    """The parent's rows a fork's store holds as lineage references (mel_core.store.lineage.lineage_references), read
    from the parent's published snapshot."""
    fork = cfg.run.fork
    try:
        reader = StoreReader(fork.store)
    except Exception as e:
        raise ForkError(f"run.fork.store: cannot read the parent's store {fork.store}: {e}") from e
    with reader:
        rows = lineage.lineage_references(reader, fork.checkpoint_id, fork.store)
    if not rows["checkpoints"]:
        raise ForkError(f"run.fork.checkpoint_id: {fork.checkpoint_id} is not a checkpoint of {fork.store}")
    return rows
