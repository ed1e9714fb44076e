"""A checkpoint: a policy version's id and where its files are, and what its directory holds, in one place —
every writer and reader of checkpoints uses this layout.

A checkpoint directory is an HF model folder (``config.json`` + ``model.safetensors``, or a peft adapter folder with
``adapter_config.json`` + ``adapter_model.safetensors`` for LoRA), the tokenizer, the optimizer state
(:data:`OPTIMIZER_FILE`) and the stats of the update that wrote it (:data:`UPDATE_STATS_FILE`). It is written
into a temp directory and renamed into place, whole or absent.

Every file of a checkpoint a run writes has its size and digest recorded in the store with the checkpoint's row
(:func:`file_digests`; ``checkpoint_files``), and a load that trains or evaluates checks them first
(:func:`damaged_files`, :class:`DamagedCheckpoint`): damaged weights are refused, never trained on.

Runs are movable: the store records a checkpoint the run wrote by its path relative to the run directory
(:func:`portable_path`), and every reader turns a recorded path into a directory with :func:`resolve_checkpoint_path`
against where the store is now; a path that resolves to nothing is :class:`MissingCheckpoint` (permanent, never a
hub lookup).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mel_core.errors import PermanentError

OPTIMIZER_FILE = "optimizer.pt"
UPDATE_STATS_FILE = "update_stats.json"


@dataclass(frozen=True)
class Checkpoint:
    """A policy version: its id (the lineage key) and where its weights are. What flows, tasks and stages pass for
    a policy version, end to end."""
    checkpoint_id: str
    path: str


class MissingCheckpoint(PermanentError, FileNotFoundError):
    """A checkpoint's directory is not where its run says: moved or deleted. Retrying cannot bring it back, and the
    path must never be read as a hub model name."""


def portable_path(path: str | Path, run_dir: str | Path) -> str:
    """What the store records of a checkpoint's directory: its path relative to the run directory when it is inside
    it (``checkpoints/<config hash>/step-NNNNN``: the run can be copied or moved), else its absolute path (a base
    model, a fork's parent's checkpoint) or the hub name it is."""
    p, rd = Path(path), Path(run_dir).absolute()
    if not p.is_absolute():
        return str(path)  # a hub model name
    try:
        return p.relative_to(rd).as_posix()
    except ValueError:
        return str(p)


def _run_tail(p: Path) -> tuple[str, ...] | None:
    """``('checkpoints', hash, 'step-NNNNN')`` when `p` is a run's checkpoint directory, else None."""
    parts = p.parts
    return parts[-3:] if len(parts) > 3 and parts[-3] == "checkpoints" else None


def resolve_checkpoint_path(path: str | Path, run_dir: str | Path) -> Path:
    """The directory a checkpoint path recorded in the store of `run_dir` (the directory the store file is in now)
    names: the one function every reader of a recorded checkpoint path calls.

    A relative path (what runs record) is relative to `run_dir`. An absolute one (stores written before runs were
    movable, cached task results, a fork's parent) is taken as it is, unless it is another directory's
    ``checkpoints/<hash>/step-NNNNN`` and the same tail exists under `run_dir`: then it is this run's own copy (a run
    copied with ``cp -a`` reads its own checkpoints, not the original's; a moved run finds them where they are now).
    A relative path that is no run's (``org/model``, a base checkpoint's hub name) is returned as it is. Whether the
    result exists is the caller's to check."""
    p, rd = Path(path), Path(run_dir)
    if not p.is_absolute():  # relative to the run directory, or a hub model's name (a base checkpoint)
        return rd / p if p.parts[:1] == ("checkpoints",) or (rd / p).is_dir() else p
    tail = _run_tail(p)
    if tail is not None and p.parent.parent.parent != rd and (rd.joinpath(*tail)).is_dir():
        return rd.joinpath(*tail)
    return p


def require_checkpoint_dir(checkpoint_id: str, path: str | Path, run_dir: str | Path | None) -> Path:
    """`path` if it is a directory, else MissingCheckpoint in one line naming the run directory."""
    p = Path(path)
    if p.is_dir():
        return p
    where = f" (run directory {run_dir})" if run_dir is not None else ""
    tail = _run_tail(p)
    if run_dir is not None and tail is not None and Path(run_dir).joinpath(*tail) != p:
        where = f" nor at {Path(run_dir).joinpath(*tail)}{where}"  # a stale path: say where this run's own would be
    raise MissingCheckpoint(f"checkpoint {checkpoint_id}: no directory at {p}{where}: its files were moved or deleted "
                            f"(a run's checkpoints are under its own directory, <run>/checkpoints/)")


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
    try:
        torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    except RuntimeError as e:  # a full disk is "[enforce fail at inline_container.cc:672] . unexpected pos ..."
        if "inline_container" not in str(e):
            raise
        raise OSError(f"cannot write {directory / OPTIMIZER_FILE}: {_free(directory)} free on its filesystem "
                      f"(torch.save: {str(e).strip().splitlines()[0][:120]})") from None
    if update_stats is not None:
        write_update_stats(directory, update_stats)


def _free(directory: Path) -> str:
    """Free space of `directory`'s filesystem, as a user reads it (0 B: the disk is full)."""
    import shutil

    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return "unknown space"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if free >= scale:
            return f"{free / scale:.1f} {unit}"
    return f"{free} B"


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


# ------------------------------------------------------------------------------------------------ digests

# blake2b-256 of each 64 MiB block, then blake2b-256 of the file's size and the block digests. Blocks are hashed on
# threads (hashlib and pread release the GIL), so a 30 GB model folder hashes at several GB/s on a GPU host rather
# than at one core's ~0.8 GB/s; the name is recorded with every digest, so another scheme can come later.
DIGEST = "blake2b-256/64MiB-blocks"
_BLOCK = 64 << 20
_READ = 1 << 20


class DamagedCheckpoint(PermanentError, OSError):
    """A checkpoint file is missing or differs from what was recorded when it was written: loading it would train
    or evaluate on damaged weights, and retrying cannot repair it."""


@dataclass(frozen=True)
class FileDigest:
    """What is recorded of one checkpoint file: its path inside the checkpoint directory, size and digest."""
    file: str
    size: int
    digest: str
    algorithm: str = DIGEST


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _block_digest(path: Path, index: int, size: int) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    start, end = index * _BLOCK, min(size, (index + 1) * _BLOCK)
    with open(path, "rb", buffering=0) as f:
        fd, at = f.fileno(), start
        while at < end:
            data = os.pread(fd, min(_READ, end - at), at)
            if not data:  # shorter than it was a moment ago: the digest can only differ
                break
            h.update(data)
            at += len(data)
    return h.digest()


def _digests(paths: list[Path]) -> dict[Path, tuple[int, str]]:
    """{path: (size, digest)} of regular files, every block of every file on a pool of threads."""
    sizes = {p: p.stat().st_size for p in paths}
    blocks = [(p, i) for p in paths for i in range(max(1, -(-sizes[p] // _BLOCK)))]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda b: _block_digest(b[0], b[1], sizes[b[0]]), blocks))
    out: dict[Path, hashlib.blake2b] = {p: hashlib.blake2b(sizes[p].to_bytes(8, "little"), digest_size=32)
                                        for p in paths}
    for (p, _), part in zip(blocks, parts):
        out[p].update(part)
    return {p: (sizes[p], h.hexdigest()) for p, h in out.items()}


def file_digests(path: str | Path) -> list[FileDigest]:
    """Size and digest of every file of the checkpoint directory at `path` (what is recorded when it is written)."""
    directory = Path(path)
    found = _digests(_files(directory))
    return [FileDigest(p.relative_to(directory).as_posix(), size, digest) for p, (size, digest) in found.items()]


def damaged_files(path: str | Path, recorded: list[FileDigest]) -> list[tuple[str, str]]:
    """(file path, what is wrong) for every recorded file of the checkpoint at `path` that is missing or differs
    from its record; [] when all match. Sizes are compared first (free); only files of the right size are hashed.
    Files the directory gained since are not judged: they were never part of the checkpoint."""
    directory = Path(path)
    bad, to_hash = [], {}
    for r in recorded:
        f = directory / r.file
        if r.algorithm != DIGEST:
            bad.append((str(f), f"recorded with digest {r.algorithm!r}, which this version of mel cannot check"))
        elif not f.is_file():
            bad.append((str(f), "missing"))
        elif (size := f.stat().st_size) != r.size:
            bad.append((str(f), f"{size} bytes, {r.size} when it was written"))
        else:
            to_hash[f] = r
    for f, (_, digest) in _digests(list(to_hash)).items():
        if digest != to_hash[f].digest:
            bad.append((str(f), "its contents differ from when it was written (blake2b digest mismatch)"))
    return sorted(bad)


def _unreadable(e: BaseException) -> bool:
    """Whether `e` is how a loader fails on a cut or damaged file: safetensors' SafetensorError (a header cut short,
    "incomplete metadata"), torch.load's zip reader errors, a pickle cut short."""
    import pickle

    if type(e).__name__ == "SafetensorError" or isinstance(e, (EOFError, pickle.UnpicklingError)):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("PytorchStreamReader", "inline_container",
                                                                     "zip archive", "central directory"))


@contextlib.contextmanager
def reading_checkpoint(path: str | Path) -> Iterator[None]:
    """Loads of a checkpoint's files: one that fails on a truncated or damaged file (a checkpoint without recorded
    digests, or loaded by path) is DamagedCheckpoint, one line naming the directory and what the loader said."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DamagedCheckpoint) or not _unreadable(e):
            raise
        said = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read, its files are damaged or incomplete: "
                                f"{type(e).__name__}: {said}") from None


def verify_checkpoint(checkpoint_id: str, path: str | Path, recorded: list[FileDigest]) -> None:
    """Refuse a checkpoint whose recorded files are missing or damaged: DamagedCheckpoint, in one line naming the
    first bad file (and how many others there are)."""
    bad = damaged_files(path, recorded)
    if bad:
        (file, what), more = bad[0], len(bad) - 1
        raise DamagedCheckpoint(f"checkpoint {checkpoint_id} is damaged, refusing to load it: {file}: {what}"
                                + (f" (and {more} more file{'s' if more > 1 else ''}; mel verify lists them)"
                                   if more else ""))
