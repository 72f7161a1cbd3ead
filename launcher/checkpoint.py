"""Checkpoints that are complete or absent, never half-written, and loaded without unpickling code.

Layout: `<run.dir>/checkpoints/step_<N>/` holding the files each rank wrote (which files is the
trainer's business; sharded strategies add a DCP directory, `sharded/`) and `meta.json` with the
step and a sha256 per file. A save writes into
`.tmp_step_<N>/`; after every rank has written, rank 0 adds meta.json and renames the directory:
the rename is the commit. A killed save leaves only a `.tmp_*` directory, which is never loaded.
Loads verify checksums and use `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.dist import DistSession
from launcher.errors import ConfigError

log = logging.getLogger(__name__)

META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or refused; the message names the file."""


@dataclass
class _Pending:
    """An asynchronous sharded save whose files are still being written."""

    step: int
    tmp: Path
    final: Path
    hashes: dict[str, str]
    meta: dict[str, Any]
    future: Any


class Checkpointer:
    def __init__(self, root: Path, keep: int, session: DistSession, async_save: bool = False) -> None:
        self.root, self.keep, self.session = root, keep, session
        self.async_save = async_save
        self.pending: _Pending | None = None

    def check_writable(self) -> bool:
        """Can this rank create files under the checkpoint directory? Checked at start, not at step 10k."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe_rank{self.session.rank}"
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False

    def save(
        self,
        step: int,
        files: dict[str, Any],
        meta: dict[str, Any],
        sharded: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> Path:
        """Collective: every rank writes its `files` (and its part of `sharded`, with DCP, into
        `sharded/`: launcher/sharded_checkpoint.py); rank 0 commits. Returns the checkpoint path.

        With `async_save` and `sharded`, the shards are copied to host memory and written by a
        background thread; unless `wait`, the commit happens at the next save (or `finish_pending`),
        and until then the previous checkpoint is the newest complete one.
        """
        self.finish_pending()
        tmp, final = self.root / f".tmp_step_{step}", self.root / f"step_{step}"
        if self.session.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            tmp.mkdir(parents=True)
        self.session.barrier()
        hashes = {}
        for name, state in files.items():
            path = tmp / name
            torch.save(state, path)
            _fsync(path)
            hashes[name] = sha256(path)
        if sharded is not None:
            from launcher import sharded_checkpoint as dcp_files  # noqa: PLC0415 - cycle

            directory = tmp / dcp_files.SHARDED_DIR
            if self.async_save:
                future = dcp_files.start_async_save(sharded, directory, self.session)
                self.pending = _Pending(step, tmp, final, hashes, meta, future)
                return self.finish_pending() if wait else final
            hashes.update(dcp_files.save_sharded(sharded, directory, self.session))
        return self._commit(step, tmp, final, hashes, meta)

    def finish_pending(self) -> Path | None:
        """Collective: wait for an asynchronous save's writes, then commit it; None if there is none."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        from launcher.sharded_checkpoint import SHARDED_DIR, finish_async_save  # noqa: PLC0415 - cycle

        hashes = {
            **pending.hashes,
            **finish_async_save(pending.future, pending.tmp / SHARDED_DIR, self.session),
        }
        path = self._commit(pending.step, pending.tmp, pending.final, hashes, pending.meta)
        log.info("saved %s (written in the background)", path)
        return path

    def _commit(
        self, step: int, tmp: Path, final: Path, hashes: dict[str, str], meta: dict[str, Any]
    ) -> Path:
        """Collective: rank 0 writes meta.json (every rank's checksums) and renames tmp into place."""
        all_hashes = self.session.all_gather_object(hashes)
        if self.session.is_main:
            merged = {name: digest for rank_hashes in all_hashes for name, digest in rank_hashes.items()}
            record = {"step": step, "saved_at": time.time(), "files": merged, **meta}
            (tmp / META).write_text(json.dumps(record, indent=1))
            _fsync(tmp / META)
            if final.exists():  # e.g. re-reaching a step after resuming from an older checkpoint
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(self.root)
            self._prune()
        self.session.barrier()
        return final

    def restore(self, resume: str, read: Callable[[Path], Any], apply: Callable[[Any], None]) -> int | None:
        """Collective: load the checkpoint `resume` asks for; returns its step, or None to start fresh.

        `read(path)` loads and verifies this rank's files without side effects; `apply` installs them.
        With resume=auto, a checkpoint that any rank cannot read is skipped, with a warning, for the
        next older one. `read` raising ConfigError (an intact checkpoint of another layout or model)
        refuses the resume on every rank.

        Raises:
            CheckpointError: resume=<path> is unreadable, or checkpoints exist but none is usable.
        """
        if resume == "never":
            return None
        explicit = resume != "auto"
        candidates = [Path(resume)] if explicit else complete_checkpoints(self.root)
        for path in candidates:
            error: Exception | None = None
            refusal: tuple | None = None
            try:
                state = read(path)
            except CheckpointError as err:
                error = err
            except ConfigError as err:  # intact, but not for this run: refuse, on every rank at once
                refusal = (err.field, err.value, err.problem, err.fix)
            refusals = [r for r in self.session.all_gather_object(refusal) if r is not None]
            if refusals:
                raise ConfigError(*refusals[0])
            if self.session.all_agree(error is None):
                apply(state)
                return read_meta(path)["step"]
            reason = str(error) if error else "another rank could not read its files"
            if explicit:
                raise CheckpointError(f"cannot resume from {path}: {reason}")
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, reason)
        if candidates:
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoints in {self.root} could be read (see the warnings "
                "above). They are left as they are; resume=<path> names one to try, resume=never starts "
                "fresh in this directory, another run.dir starts elsewhere"
            )
        return None

    def _prune(self) -> None:
        for old in complete_checkpoints(self.root)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints (a step_<N> directory with a readable meta.json), newest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            try:
                read_meta(path)
            except CheckpointError as err:
                log.warning("ignoring %s: %s", path, err)
                continue
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
        assert isinstance(meta["step"], int) and isinstance(meta["files"], dict)
        return meta
    except (OSError, ValueError, KeyError, AssertionError) as err:
        raise CheckpointError(f"{path / META}: missing or unreadable ({err})") from None


def load_file(checkpoint: Path, name: str, meta: dict | None = None) -> Any:
    """Verify `name` against meta.json's checksum, then torch.load it with weights_only=True."""
    meta = meta or read_meta(checkpoint)
    path = checkpoint / name
    expected = meta["files"].get(name)
    if expected is None or not path.is_file():
        raise CheckpointError(f"{path}: missing (saved with a different parallel layout or world size?)")
    if sha256(path) != expected:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or truncated")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to load is reported the same way
        raise CheckpointError(
            f"{path}: refused to load ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
