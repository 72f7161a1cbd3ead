"""A full disk costs nothing already saved: a run on a small tmpfs that the test mounts and unmounts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from launcher.launch.diskspace import DiskFull, tree_bytes
from launcher.observe.metrics import MetricsFile
from tests.conftest import TINY_GPT, assert_ok, launch, newest_intact_checkpoint, relative_diff
from tests.reliability.test_launcher_run import launcher_run

FAULTY = [
    *TINY_GPT,
    "recipe=tests.faults.faulty:FaultyGPT",
    "train.micro_batch_size=4",
    "optim.warmup_steps=2",
]


@contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` for the block; skipped where this machine cannot mount."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)])


def fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the disk."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(disk).free - leave))
    return filler


@pytest.mark.dist
@pytest.mark.slow
def test_a_full_disk_during_a_save_loses_nothing_and_the_same_command_resumes(tmp_path):
    args = [*FAULTY, "train.steps=8", "checkpoint.every=4"]
    with small_disk(tmp_path / "disk", "4m") as disk:
        run_dir, ckpts = disk / "run", disk / "run" / "checkpoints"
        assert_ok(launch([*args, "train.stop_at_step=4"], tmp_path, nproc=2, run_dir=run_dir))
        checkpoint_bytes = tree_bytes(ckpts / "step_4")
        filler = fill(disk, leave=128 * 1024)  # room for metrics lines, not for a checkpoint
        assert checkpoint_bytes > 3 * 128 * 1024
        metrics_before = (run_dir / "metrics.jsonl").read_text()

        command = [*args, f"run.dir={run_dir}"]
        full = launcher_run(command, tmp_path)
        out = full.stdout + full.stderr
        assert full.returncode == 6, out[-3000:]
        assert "Traceback" not in out
        # Warned early (the first step knows a checkpoint's size), then one message naming it all.
        early = "each checkpoint of this run needs about .* KiB, but only .* KiB is free under "
        assert re.search(early + re.escape(str(ckpts)), out)
        message = (
            f"checkpoint step_8 could not be written: no space left on device in {ckpts} "
            "(the checkpoint needs about "
        )
        assert out.count(message) == 1, out[-3000:]
        assert (
            "The partial .tmp_step_8 was removed; step_4 and every earlier checkpoint and metrics.jsonl "
            "are intact" in out
        )
        assert "rerun the same command: resume=auto continues from step_4" in out
        assert "exited with 6: could not write to the run directory (disk full?) <- the cause" in out

        assert sorted(p.name for p in ckpts.iterdir()) == ["step_4"]  # no .tmp_step_8 left
        assert newest_intact_checkpoint(run_dir) == 4
        lines = (run_dir / "metrics.jsonl").read_text()
        assert lines.startswith(metrics_before)
        assert [json.loads(line)["step"] for line in lines.splitlines()] == list(range(1, 9))  # whole lines

        filler.unlink()  # space freed: the same command continues
        resumed = launcher_run(command, tmp_path)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert "resumed from step 4" in resumed.stdout + resumed.stderr
        steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 9))
        resumed_model = torch.load(ckpts / "step_8" / "model.pt", weights_only=True)
    straight = launch(args, tmp_path, nproc=2, run_dir=tmp_path / "straight")
    assert_ok(straight)
    assert relative_diff(resumed_model, straight.model(8)) == 0.0


def test_a_metrics_line_that_does_not_fit_is_cut_off_whole(tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        metrics = MetricsFile(disk / "metrics.jsonl")
        metrics.write({"step": 1, "loss": 1.0})
        before = metrics.path.read_bytes()
        fill(disk, leave=0)
        with pytest.raises(DiskFull, match="no space left on device writing .*metrics.jsonl"):
            metrics.write({"step": 2, "loss": 0.5, "pad": "x" * 20000})
        assert metrics.path.read_bytes() == before
