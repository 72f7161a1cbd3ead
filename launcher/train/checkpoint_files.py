"""What every checkpoint format shares at the file level: the error that names a bad file, the
checksum meta.json records, and fsync. A leaf: checkpoint.py and sharded_checkpoint.py both use it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or refused; the message names the file."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
