"""Disk space: say early when a checkpoint will not fit, and name a full disk clearly when it happens.

A full disk must cost nothing already saved: a checkpoint that cannot be written is removed
(launcher/train/checkpoint.py), a metrics line that cannot be written is cut off
(launcher/observe/metrics.py), and the run exits with code 6 and one message naming the directory, the
bytes needed and the bytes free.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(RuntimeError):
    """A write in the run directory failed, for lack of space (or, for a checkpoint, any write error);
    nothing saved before was lost. Exit 6."""


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, also when wrapped: torch.save reports a failed write of the file object it was
    given as `RuntimeError: ... unexpected pos ...`, with the OSError as its context."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in FULL:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def payload_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state (what torch.save writes, less a little metadata)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return _sum(state.values())
    if isinstance(state, list | tuple):
        return _sum(state)
    return 0


def _sum(items: Iterable[Any]) -> int:
    return sum(payload_bytes(item) for item in items)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_message(err: OSError, path: Path | None = None) -> str:
    """One line for a full disk met outside a checkpoint save."""
    where = path or (Path(err.filename) if err.filename else None)
    free = f" ({size(free_bytes(where))} free)" if where else ""
    return (
        f"no space left on device writing {where or 'a file'}{free}; nothing saved before was lost. Free "
        "space and rerun the same command: resume=auto continues from the newest checkpoint"
    )


def warn_if_short(root: Path, needed: int, what: str, keep_hint: bool = True) -> bool:
    """Warn if `root`'s filesystem has less than `needed` bytes free; returns whether it had enough."""
    free = free_bytes(root)
    if free >= needed:
        return True
    hint = "free space, lower checkpoint.keep, or choose another run.dir" if keep_hint else "free space"
    log.warning(
        "%s needs about %s, but only %s is free under %s: it will fail unless you %s",
        what,
        size(needed),
        size(free),
        root,
        hint,
    )
    return False
