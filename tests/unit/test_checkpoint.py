"""Checkpoints are committed atomically, verified on load, and never unpickle code."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from launcher.launch.diskspace import DiskFull
from launcher.launch.dist import DistEnv, DistSession
from launcher.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    complete_checkpoints,
    load_file,
    read_meta,
)


@pytest.fixture
def checkpointer(tmp_path):
    return Checkpointer(
        tmp_path / "checkpoints", keep=3, session=DistSession(DistEnv(), torch.device("cpu"), None)
    )


def save(checkpointer, step, value=1.0):
    return checkpointer.save(step, {"model.pt": {"w": torch.full((4,), value)}}, {"world_size": 1})


def test_save_commits_with_checksums_and_keeps_last_k(checkpointer):
    for step in (1, 2, 3, 4):
        save(checkpointer, step, float(step))
    assert [p.name for p in complete_checkpoints(checkpointer.root)] == ["step_4", "step_3", "step_2"]
    meta = read_meta(checkpointer.root / "step_4")
    assert meta["step"] == 4 and set(meta["files"]) == {"model.pt"}
    assert torch.equal(load_file(checkpointer.root / "step_4", "model.pt")["w"], torch.full((4,), 4.0))
    assert not list(checkpointer.root.glob(".tmp_*"))


def test_half_written_save_is_never_complete(checkpointer):
    save(checkpointer, 1)
    partial = checkpointer.root / ".tmp_step_2"  # a save killed before its commit (rename)
    partial.mkdir()
    torch.save({"w": torch.zeros(4)}, partial / "model.pt")
    no_meta = checkpointer.root / "step_3"  # a directory without meta.json is not a checkpoint either
    no_meta.mkdir()
    assert [p.name for p in complete_checkpoints(checkpointer.root)] == ["step_1"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_named_and_auto_falls_back(checkpointer, damage, caplog):
    save(checkpointer, 1, 1.0)
    good = save(checkpointer, 2, 2.0)
    path = good / "model.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}: checksum mismatch"):
        load_file(good, "model.pt")

    loaded = {}
    step = checkpointer.restore("auto", lambda p: load_file(p, "model.pt"), loaded.update)
    assert step == 1 and torch.equal(loaded["w"], torch.full((4,), 1.0))
    assert "step_2 is unusable" in caplog.text
    with pytest.raises(CheckpointError, match="cannot resume from"):
        checkpointer.restore(str(good), lambda p: load_file(p, "model.pt"), loaded.update)


def test_all_checkpoints_unusable_is_an_error_not_a_fresh_start(checkpointer):
    bad = save(checkpointer, 1)
    (bad / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        checkpointer.restore("auto", lambda p: load_file(p, "model.pt"), lambda s: None)
    assert checkpointer.restore("never", lambda p: 1 / 0, lambda s: None) is None


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused(checkpointer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = save(checkpointer, 1)
    evil = ckpt / "model.pt"
    evil.write_bytes(pickle.dumps({"w": Exploit()}))
    meta = json.loads((ckpt / "meta.json").read_text())
    from launcher.train.checkpoint import sha256

    meta["files"]["model.pt"] = sha256(evil)  # an attacker can fix the checksum too
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_file(ckpt, "model.pt")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "errno_, says", [(28, "no space left on device in"), (5, "rank 0 could not write in")]
)
def test_a_failed_save_is_removed_and_named_and_the_older_one_kept(checkpointer, monkeypatch, errno_, says):
    save(checkpointer, 1, 1.0)
    real_save = torch.save

    def fails_midway(state, f):
        real_save(state, f)  # a partial file on disk, as a full disk leaves it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from OSError(
            errno_, "x"
        )

    monkeypatch.setattr(torch, "save", fails_midway)
    with pytest.raises(DiskFull, match=f"checkpoint step_2 could not be written: {says}") as failed:
        save(checkpointer, 2, 2.0)
    assert "The partial .tmp_step_2 was removed; step_1 and every earlier checkpoint" in str(failed.value)
    assert "resume=auto continues from step_1" in str(failed.value)
    assert [p.name for p in checkpointer.root.iterdir()] == ["step_1"]


def test_a_failed_commit_puts_the_checkpoint_it_replaced_back(checkpointer, monkeypatch):
    save(checkpointer, 2, 2.0)  # re-reaching step 2 after resuming from an older checkpoint
    real_rename = os.rename

    def no_space_for_the_new(src, dst):
        if str(src).endswith(".tmp_step_2"):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", no_space_for_the_new)
    with pytest.raises(DiskFull):
        save(checkpointer, 2, 3.0)
    assert sorted(p.name for p in checkpointer.root.iterdir()) == ["step_2"]
    assert torch.equal(load_file(checkpointer.root / "step_2", "model.pt")["w"], torch.full((4,), 2.0))
