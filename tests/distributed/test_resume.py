"""Checkpoint/resume loses no step: a stopped and resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import TINY_GPT, assert_ok, launch

pytestmark = pytest.mark.dist

# Dropout on: the resumed run must also restore every RNG to draw the same masks.
ARGS = [
    *TINY_GPT,
    "train.steps=20",
    "train.micro_batch_size=4",
    "recipe.model.dropout=0.1",
    "optim.warmup_steps=5",
]


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_equals_uninterrupted_run_four_ranks(tmp_path):
    # Four ranks, not two: a sum over two ranks is the same in any order, over three or more the
    # order depends on DDP's bucket layout, which a resumed run must get right from its first step.
    straight = launch(ARGS, tmp_path, nproc=4, run_dir=tmp_path / "straight")
    assert_ok(straight)
    first = launch([*ARGS, "train.stop_at_step=10"], tmp_path, nproc=4, run_dir=tmp_path / "resumed")
    assert_ok(first)
    assert [m["step"] for m in first.train_lines()] == list(range(1, 11))
    second = launch([*ARGS, "resume=auto"], tmp_path, nproc=4, run_dir=tmp_path / "resumed")
    assert_ok(second)
    assert "resumed from step 10" in second.output

    assert_same_params(second.model(20), straight.model(20))
    resumed_lines = {m["step"]: m for m in second.train_lines()}
    straight_lines = {m["step"]: m for m in straight.train_lines()}
    assert sorted(resumed_lines) == list(range(1, 21))  # each step exactly once
    for step in range(11, 21):
        assert resumed_lines[step]["loss"] == straight_lines[step]["loss"], step
        assert resumed_lines[step]["grad_norm"] == straight_lines[step]["grad_norm"], step
        assert resumed_lines[step]["lr"] == straight_lines[step]["lr"], step


def test_steps_logged_after_the_last_checkpoint_are_not_duplicated(tmp_path):
    run_dir = tmp_path / "run"
    crashed = launch([*ARGS, "checkpoint.every=5", "train.stop_at_step=12"], tmp_path, run_dir=run_dir)
    assert_ok(crashed)
    # As if the job died after logging step 12 but before its checkpoint was committed.
    shutil.rmtree(run_dir / "checkpoints" / "step_12")
    resumed = launch([*ARGS, "checkpoint.every=5"], tmp_path, run_dir=run_dir)
    assert_ok(resumed)
    assert "resumed from step 10" in resumed.output
    assert [m["step"] for m in resumed.train_lines()] == list(range(1, 21))
    straight = launch([*ARGS, "checkpoint.every=5"], tmp_path, run_dir=tmp_path / "straight")
    assert_same_params(resumed.model(20), straight.model(20))


def test_resume_from_explicit_path_and_never(tmp_path):
    source = launch([*ARGS, "train.stop_at_step=10", "checkpoint.every=5"], tmp_path, run_dir=tmp_path / "a")
    assert_ok(source)
    ckpt = tmp_path / "a" / "checkpoints" / "step_5"
    other = launch([*ARGS, f"resume={ckpt}", "train.stop_at_step=6"], tmp_path, run_dir=tmp_path / "b")
    assert_ok(other)
    assert "resumed from step 5" in other.output
    assert [m["step"] for m in other.train_lines()] == [6]
    fresh = launch([*ARGS, "resume=never", "train.stop_at_step=2"], tmp_path, run_dir=tmp_path / "a")
    assert_ok(fresh)
    assert "resumed" not in fresh.output
