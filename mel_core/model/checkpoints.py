"""A checkpoint: a policy version's id and where its files are, and what its directory holds, in one place —
every writer and reader of checkpoints uses this layout.

A checkpoint directory is an HF model folder (``config.json`` + ``model.safetensors``, or a peft adapter folder with
``adapter_config.json`` + ``adapter_model.safetensors`` for LoRA), the tokenizer, the optimizer state
(:data:`OPTIMIZER_FILE`) and the stats of the update that wrote it (:data:`UPDATE_STATS_FILE`). It is written
into a temp directory and renamed into place, whole or absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

OPTIMIZER_FILE = "optimizer.pt"
UPDATE_STATS_FILE = "update_stats.json"


@dataclass(frozen=True)
class Checkpoint:
    """A policy version: its id (the lineage key) and where its weights are. What flows, tasks and stages pass for
    a policy version, end to end."""
    checkpoint_id: str
    path: str


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def saved_update_stats(path: str | Path) -> dict | None:
    """The stats of the update that wrote the checkpoint at `path`, if it is complete and has them."""
    f = Path(path) / UPDATE_STATS_FILE
    return json.loads(f.read_text()) if f.exists() else None


def write_update_stats(directory: str | Path, stats: dict) -> None:
    (Path(directory) / UPDATE_STATS_FILE).write_text(json.dumps(stats, sort_keys=True))


def write_checkpoint(directory: str | Path, model, tokenizer, optimizer_state: dict, update_stats: dict | None,
                     state_dict: dict | None = None) -> None:
    """The checkpoint layout, written into `directory` (a temp directory its caller renames into place): the HF
    model folder (`state_dict` when the model's own is sharded), the tokenizer, the optimizer state in the
    single-process layout, and the update's stats."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(str(directory))
    torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    if update_stats is not None:
        write_update_stats(directory, update_stats)


def has_optimizer_state(path: str | Path) -> bool:
    return (Path(path) / OPTIMIZER_FILE).exists()


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a loadable checkpoint (or model folder), in a few words; None if it looks like one."""
    p = Path(path)
    if not p.is_dir():
        return "no such directory"
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        return "no config.json (not a model folder saved with save_pretrained)"
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        return f"no weights ({', '.join(WEIGHT_FILES)})"
    return None
