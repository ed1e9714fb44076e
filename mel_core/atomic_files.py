"""Files that appear whole or not at all: temp siblings tagged with their owner, renamed into place.

A checkpoint directory, the warm-started model, the store's reader snapshot and the files of ``mel export``
and ``mel query --out`` are each written into a temp sibling ``<name>.tmp-<host>-<pid>`` and renamed over
``<name>``, so a reader never sees half of one and a crash leaves a temp, not a torn file. A temp is cleaned
up only by its own process or once its process is gone: another live process's temp is its work in progress,
not litter.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def temp_name(path: Path) -> Path:
    """The temp sibling this process writes `path` through."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{_tag()}")


def _owner_is_gone(tag: str) -> bool:
    """A ``<host>-<pid>[.suffix]`` tag whose process has ended (or is this process). Other hosts' processes
    cannot be checked from here: their temps are left alone."""
    m = re.fullmatch(r"(.+)-(\d+)(?:\..*)?", tag)
    if m is None or m.group(1) != socket.gethostname():
        return False
    pid = m.group(2)
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temps of `path` left by this process or by dead processes of this host; returns them."""
    path = Path(path)
    removed = []
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        if _owner_is_gone(stale.name.split(".tmp-", 1)[1]):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def write_dir_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temp directory beside `path`, which is then renamed to `path`: whole or absent.
    An existing `path` is kept as it is (another process finished the same write first, or an earlier run)."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        try:
            os.rename(tmp, path)  # not replace: a directory someone else renamed into place first is kept
        except OSError:
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_file_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes a temp file beside `path`, which then replaces `path`: a reader (or a training job
    loading an export) sees the old file or the new one whole, never a half-written one. A directory at `path` is
    refused before anything is written (IsADirectoryError): the rename would fail only after the whole write."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory (a file is written there)", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def copy_file_atomically(source: str | Path, target: str | Path) -> Path:
    """Copy `source` to `target` through a temp sibling and a rename (replacing an older `target`)."""
    target = Path(target)
    remove_stale_temps(target)
    tmp = temp_name(target)
    _copy_bytes(Path(source), tmp)
    os.replace(tmp, target)
    return target


def _copy_bytes(source: Path, target: Path) -> None:
    """copy_file_range: in the kernel, and a reflink (no bytes copied) on filesystems that share extents
    (XFS, btrfs); plain copy where it is not supported."""
    with source.open("rb") as src, target.open("wb") as dst:
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining > 0:
                n = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
                if n == 0:
                    break
                remaining -= n
        except OSError:  # not supported across these filesystems: copy in user space
            src.seek(0)
            dst.seek(0)
            dst.truncate()
            shutil.copyfileobj(src, dst, 1 << 20)
