"""Checkpoints written off the critical path (run.async_save): the update copies the policy's state to host memory
and one background thread writes the checkpoint directory from that copy while the next step generates.

The copy is taken on the caller's thread before it returns, so the optimizer steps that follow — in place — cannot
change what is being written, and the directory appears whole or not at all (``write_dir_atomically``), as a
synchronous save's does. The thread writes files only: the records that say the checkpoint exists are the caller's
to commit once the write has finished (``mel_core.step.runtime.Runtime.settle_saves``), so a process that dies
mid-write leaves a temp directory and no record of it.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mel_core.atomic_files import write_dir_atomically
from mel_core.errors import PermanentError
from mel_core.model.checkpoints import Checkpoint


class SaveFailed(PermanentError, RuntimeError):
    """A checkpoint written in the background could not be written. Permanent for the stage it surfaces in: retrying
    that stage cannot bring the lost checkpoint back; rerunning the campaign recomputes the update that made it."""


def host_copy(obj, into=None):
    """`obj` (a state dict: nested dicts, lists and tuples of tensors and plain values) with every tensor copied to
    host memory — on the CPU a copy too, so nothing later done to the originals shows in it. Tensors that share
    storage share it in the copy (a tied lm_head stays tied to its embedding: save_pretrained finds ties by storage,
    and would otherwise write both).

    `into`: an earlier copy of the same structure that nothing reads any more; its buffers are reused where they fit.
    Fresh host memory costs more than the copy itself — the first touch of every page: 0.65-4.2 s for 1.2 GB on
    a shared 2-core CPU, against 0.1 s into buffers touched before. A copy from a GPU goes to pinned memory, which
    the device copies to at full speed."""
    return _Copier().copy(obj, into)


class _Copier:
    def __init__(self):
        self.hosts: dict[tuple, torch.UntypedStorage] = {}  # (device, source storage) -> its host copy
        self.taken: set[int] = set()  # host storages already given to a source: a reused buffer serves one

    def copy(self, obj, into):
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in self.hosts:
                self.hosts[key] = self._storage(t.untyped_storage(), t.device, into)
            return torch.empty(0, dtype=t.dtype).set_(self.hosts[key], t.storage_offset(), t.size(), t.stride())
        if isinstance(obj, dict):
            into = into if isinstance(into, dict) else {}
            return {k: self.copy(v, into.get(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            into = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else [None] * len(obj)
            return type(obj)(self.copy(v, i) for v, i in zip(obj, into))
        return obj  # numbers, strings, None: immutable

    def _storage(self, source: torch.UntypedStorage, device: torch.device, into) -> torch.UntypedStorage:
        data = torch.empty(0, dtype=torch.uint8, device=device).set_(source)  # the storage's bytes, whole
        host = into.untyped_storage() if isinstance(into, torch.Tensor) and into.device.type == "cpu" else None
        if host is not None and host.nbytes() == source.nbytes() and host.data_ptr() not in self.taken:
            torch.empty(0, dtype=torch.uint8).set_(host).copy_(data)
        elif device.type == "cpu":
            host = data.clone().untyped_storage()
        else:
            host = torch.empty(data.numel(), dtype=torch.uint8, pin_memory=True).copy_(data).untyped_storage()
        self.taken.add(host.data_ptr())
        return host


_writer: ThreadPoolExecutor | None = None


def _thread() -> ThreadPoolExecutor:
    """The process's one save thread. Its pool joins it at interpreter exit, so a process that ends by an exception
    still finishes the directory it was writing (a later run takes it as it finds it)."""
    global _writer
    if _writer is None:
        _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mel-checkpoint-save")
    return _writer


@dataclass
class PendingSave:
    """A checkpoint being written in the background and the rows that commit once it is on disk."""
    step: int
    checkpoint: Checkpoint
    rows: dict[str, list[dict]]  # table -> rows
    future: Future = field(repr=False)  # its result: the seconds the write took


def _write(path: str, write: Callable[[Path], None]) -> float:
    t0 = time.perf_counter()
    write_dir_atomically(path, write)
    return time.perf_counter() - t0


def start(step: int, ckpt: Checkpoint, write: Callable[[Path], None], rows: dict[str, list[dict]]) -> PendingSave:
    """Write `ckpt`'s directory with `write` (filling a temp directory that is then renamed) on the save thread."""
    return PendingSave(step, ckpt, rows, _thread().submit(_write, ckpt.path, write))
