"""Checkpoints that are complete or absent, never half-written, and loaded without unpickling code.

Layout: `<run.dir>/checkpoints/step_<N>/` holding the files each rank wrote (which files is the
trainer's business; sharded strategies add a DCP directory, `sharded/`) and `meta.json` with the
step and a sha256 per file. A save writes into
`.tmp_step_<N>/`; after every rank has written, rank 0 adds meta.json and renames the directory:
the rename is the commit. A killed save leaves only a `.tmp_*` directory, which is never loaded; a
save that fails (a full disk, say) is removed on every rank's word and reported as DiskFull (exit 6).
Loads verify checksums and use `torch.load(weights_only=True)`.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.api import CheckpointException

from launcher.errors import ConfigError
from launcher.launch.diskspace import (
    DiskFull,
    free_bytes,
    is_disk_full,
    payload_bytes,
    size,
    tree_bytes,
    warn_if_short,
)
from launcher.launch.dist import DistSession
from launcher.train import sharded_checkpoint as dcp_files
from launcher.train.checkpoint_files import CheckpointError, fsync, sha256

log = logging.getLogger(__name__)

META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class _Pending:
    """An asynchronous sharded save whose files are still being written."""

    step: int
    tmp: Path
    final: Path
    hashes: dict[str, str]
    meta: dict[str, Any]
    future: Any
    needed: int
    """Bytes of the plain files, for the message should the save fail."""


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
        `sharded/`: launcher/train/sharded_checkpoint.py); rank 0 commits. Returns the checkpoint path.

        With `async_save` and `sharded`, the shards are copied to host memory and written by a
        background thread; unless `wait`, the commit happens at the next save (or `finish_pending`),
        and until then the previous checkpoint is the newest complete one.

        Raises:
            DiskFull: a rank could not write (no space, or another write error); the partial
                directory is removed and every earlier checkpoint is untouched. Raised on every rank.
        """
        self.finish_pending()
        tmp, final = self.root / f".tmp_step_{step}", self.root / f"step_{step}"
        error = None
        if self.session.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
                tmp.mkdir(parents=True)
            except OSError as err:
                error = err
        # Also the barrier after the mkdir: every rank's bytes, for the free-space check.
        needed = sum(self.session.all_gather_object(payload_bytes(files)))
        if self.session.is_main and error is None:
            warn_if_short(self.root, needed, f"checkpoint step_{step}")
        hashes: dict[str, str] = {}
        if error is None:
            try:
                for name, state in files.items():
                    path = tmp / name
                    with open(path, "wb") as f:  # a file object: a failed write keeps its OSError (errno)
                        torch.save(state, f)
                    fsync(path)
                    hashes[name] = sha256(path)
            except (OSError, RuntimeError) as err:  # RuntimeError: torch.save's wrapping of a failed write
                error = err
        # DCP's writes are collective: every rank starts them, or none does.
        if sharded is not None and self.session.all_agree(error is None):
            directory = tmp / dcp_files.SHARDED_DIR
            if self.async_save:
                future = dcp_files.start_async_save(sharded, directory, self.session)
                self.pending = _Pending(step, tmp, final, hashes, meta, future, needed)
                return self.finish_pending() if wait else final
            try:
                hashes.update(dcp_files.save_sharded(sharded, directory, self.session))
            except (OSError, RuntimeError, CheckpointException) as err:  # raised on every rank by DCP
                error = err
        return self._conclude(step, tmp, final, hashes, error, meta, needed)

    def finish_pending(self) -> Path | None:
        """Collective: wait for an asynchronous save's writes, then commit it; None if there is none.

        Raises:
            DiskFull: as `save`.
        """
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        hashes, error = dict(pending.hashes), None
        try:
            directory = pending.tmp / dcp_files.SHARDED_DIR
            hashes.update(dcp_files.finish_async_save(pending.future, directory, self.session))
        except (OSError, RuntimeError, CheckpointException) as err:
            error = err
        path = self._conclude(
            pending.step, pending.tmp, pending.final, hashes, error, pending.meta, pending.needed
        )
        log.info("saved %s (written in the background)", path)
        return path

    def _conclude(
        self,
        step: int,
        tmp: Path,
        final: Path,
        hashes: dict[str, str],
        error: BaseException | None,
        meta: dict[str, Any],
        needed: int,
    ) -> Path:
        """Collective: every rank's checksums and failure to rank 0, which commits, or removes the
        partial directory and explains; every rank then returns the path or raises DiskFull."""
        gathered = self.session.all_gather_object((hashes, _why(error, self.session.rank)))
        failure = next((why for _, why in gathered if why is not None), None)
        if self.session.is_main:
            if failure is None:
                failure = self._commit(step, tmp, final, [h for h, _ in gathered], meta)
            if failure is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                failure = self._failure_message(step, failure, needed)
        failure = self.session.broadcast_object(failure)  # also the barrier after the commit
        if failure is not None:
            raise DiskFull(failure)
        if self.session.is_main:
            self._warn_if_next_will_not_fit(final, step)
        return final

    def _commit(
        self, step: int, tmp: Path, final: Path, all_hashes: list[dict], meta: dict[str, Any]
    ) -> tuple | None:
        """Rank 0: meta.json, then the rename. Returns why it failed, or None."""
        merged = {name: digest for rank_hashes in all_hashes for name, digest in rank_hashes.items()}
        record = {"step": step, "saved_at": time.time(), "files": merged, **meta}
        # A step_<N> already there (re-reaching a step after resuming from an older checkpoint) is set
        # aside, not deleted, until the new one is in place.
        older = self.root / f".old_step_{step}"
        try:
            (tmp / META).write_text(json.dumps(record, indent=1))
            fsync(tmp / META)
            shutil.rmtree(older, ignore_errors=True)
            if final.exists():
                os.rename(final, older)
            os.rename(tmp, final)
            fsync(self.root)
        except OSError as err:
            if older.exists() and not final.exists():
                os.rename(older, final)
            return _why(err, self.session.rank)
        shutil.rmtree(older, ignore_errors=True)
        self._prune()
        return None

    def _failure_message(self, step: int, why: tuple, needed: int) -> str:
        rank, full, text = why
        previous = complete_checkpoints(self.root)
        kept = f"{previous[0].name} and every earlier checkpoint" if previous else "no earlier checkpoint"
        resume = f"resume=auto continues from {previous[0].name}" if previous else "the run starts over"
        if full:
            problem = (
                f"no space left on device in {self.root} (the checkpoint needs about {size(needed)}, "
                f"{size(free_bytes(self.root))} is free)"
            )
            fix = "Free space (or lower checkpoint.keep, or move run.dir) and rerun the same command"
        else:
            problem = f"rank {rank} could not write in {self.root} ({text})"
            fix = "Fix the cause and rerun the same command"
        return (
            f"checkpoint step_{step} could not be written: {problem}. The partial .tmp_step_{step} was "
            f"removed; {kept} and metrics.jsonl are intact. {fix}: {resume}"
        )

    def _warn_if_next_will_not_fit(self, saved: Path, step: int) -> None:
        """Rank 0, after a save: the next one will be about as large. Said a save early."""
        warn_if_short(self.root, tree_bytes(saved), f"the next checkpoint after step_{step}")

    def check_space(self, files: dict[str, Any]) -> None:
        """Collective: warn (rank 0) if the checkpoints this run will write do not fit from the start."""
        needed = sum(self.session.all_gather_object(payload_bytes(files)))
        if self.session.is_main:
            warn_if_short(self.root, needed, "each checkpoint of this run")

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


def _why(err: BaseException | None, rank: int) -> tuple[int, bool, str] | None:
    """A write failure as plain data for the other ranks: (rank, disk full?, first line)."""
    if err is None:
        return None
    return rank, is_disk_full(err), (str(err).strip().splitlines() or [type(err).__name__])[0]


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
