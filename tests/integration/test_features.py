"""Training techniques and operations features, each through the real CLI, each checked by its effect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import TINY_GPT, assert_ok, launch, relative_diff

pytestmark = pytest.mark.integration

SHORT = [*TINY_GPT, "train.steps=6", "train.micro_batch_size=4"]


def test_multirun_sweep_runs_each_point_in_its_own_dir(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "-m", *SHORT, "optim.lr=1e-3,1e-2", "run.root=sweeps"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_dirs = sorted(p for p in (tmp_path / "sweeps" / "multirun").glob("*/*") if p.is_dir())
    assert [p.name for p in job_dirs] == ["0", "1"]
    lrs = []
    for job_dir in job_dirs:
        config = (job_dir / "config.yaml").read_text()
        lrs.append(next(line for line in config.splitlines() if line.startswith("  lr:")))
        assert len((job_dir / "metrics.jsonl").read_text().splitlines()) == 6
    assert lrs == ["  lr: 0.001", "  lr: 0.01"]


def test_wandb_offline_keeps_one_run_across_resume_and_no_secret_leaks(tmp_path):
    secret = "sk-test-0123456789abcdef"
    env = {"WANDB_API_KEY": secret}
    first = launch([*SHORT, "logger=wandb", "train.stop_at_step=3"], tmp_path, env=env)
    assert_ok(first)
    run_id = (first.run_dir / "wandb_id").read_text().strip()
    second = launch([*SHORT, "logger=wandb"], tmp_path, env=env)
    assert_ok(second)
    assert (second.run_dir / "wandb_id").read_text().strip() == run_id
    offline_runs = sorted((second.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)
    assert all(list(p.glob("*.wandb")) for p in offline_runs)
    texts = [first.output, second.output] + [
        p.read_text(errors="replace")
        for p in second.run_dir.rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".jsonl", ".log", ".json")
    ]
    assert not any(secret in text for text in texts)


def test_bf16_autocast_trains(tmp_path):
    result = launch([*SHORT, "precision=bf16"], tmp_path)
    assert_ok(result)
    losses = [m["loss"] for m in result.train_lines()]
    assert all(loss == loss and loss < 6 for loss in losses)  # finite, not diverged
    assert "skipped_steps" not in result.train_lines()[-1]


def test_fp16_counts_skipped_steps(tmp_path):
    # An initial scale of 2**40 overflows fp16 gradients: the scaler skips steps and halves the scale
    # until it fits. Skipped steps are counted, the loss scale is logged, and training carries on.
    result = launch([*SHORT, "precision=fp16", "precision.init_scale=1099511627776"], tmp_path)
    assert_ok(result)
    lines = result.train_lines()
    skipped = [m["skipped_steps"] for m in lines]
    assert skipped == sorted(skipped) and skipped[-1] >= 1
    assert lines[-1]["loss_scale"] < 2.0**40
    first_params = launch(
        [*SHORT, "train.steps=1", "precision=fp16", "precision.init_scale=1099511627776"],
        tmp_path,
        run_dir=tmp_path / "one",
    ).model()
    init = launch([*SHORT, "train.steps=1", "optim.lr=1e-30"], tmp_path, run_dir=tmp_path / "init").model()
    # The skipped first step left the weights untouched (lr=1e-30 run ~ the initial weights).
    assert relative_diff(first_params, init) < 1e-6


def test_activation_checkpointing_gives_the_same_parameters(tmp_path):
    plain = launch([*SHORT], tmp_path, run_dir=tmp_path / "plain")
    recompute = launch([*SHORT, "train.activation_checkpointing=true"], tmp_path, run_dir=tmp_path / "ac")
    assert_ok(plain)
    assert_ok(recompute)
    assert relative_diff(recompute.model(), plain.model()) < 1e-6
    assert recompute.model().keys() == plain.model().keys()  # parameter names untouched


def test_compile_with_activation_checkpointing_matches_eager(tmp_path):
    """Compiled with checkpointed blocks (which once failed in Dynamo on the explicit no-op
    context_fn) learns what eager learns without them; tests/distributed/test_compile.py covers
    compile alone."""
    eager = launch([*SHORT, "train.steps=3"], tmp_path, run_dir=tmp_path / "eager")
    compiled = launch(
        [*SHORT, "train.steps=3", "train.compile=true", "train.activation_checkpointing=true"],
        tmp_path,
        run_dir=tmp_path / "compiled",
        timeout=600,
    )
    assert_ok(eager)
    assert_ok(compiled)
    for a, b in zip(eager.train_lines(), compiled.train_lines(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert compiled.model().keys() == eager.model().keys()


def test_loader_workers_give_the_same_batches(tmp_path):
    inline = launch([*SHORT], tmp_path, run_dir=tmp_path / "inline")
    workers = launch(
        [*SHORT, "loader.num_workers=2", "loader.prefetch_factor=2"], tmp_path, run_dir=tmp_path / "workers"
    )
    assert_ok(inline)
    assert_ok(workers)
    assert [m["loss"] for m in workers.train_lines()] == [m["loss"] for m in inline.train_lines()]


def test_checkpoint_every_and_keep(tmp_path):
    result = launch([*SHORT, "train.steps=8", "checkpoint.every=2", "checkpoint.keep=2"], tmp_path)
    assert_ok(result)
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["step_6", "step_8"]
    meta = json.loads((result.run_dir / "checkpoints" / "step_8" / "meta.json").read_text())
    assert meta["step"] == 8 and set(meta["files"]) == {"model.pt", "optimizer.pt", "rank_0.pt"}


def test_eval_every_zero_and_sgd(tmp_path):
    result = launch([*SHORT, "optim=sgd", "optim.lr=0.1", "train.eval_every=0"], tmp_path)
    assert_ok(result)
    assert result.eval_lines() == []
    assert result.train_lines()[-1]["step"] == 6
    state = torch.load(result.run_dir / "checkpoints" / "step_6" / "optimizer.pt", weights_only=True)
    assert "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))


def test_default_run_dir_is_shared_by_all_ranks(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "launcher",
            *SHORT,
            "train.steps=2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = tmp_path / "runs" / "gpt"
    (run_dir,) = [
        p for p in runs.iterdir() if p.name != "latest"
    ]  # one directory, named by torchrun's run id
    assert (runs / "latest").resolve() == run_dir.resolve()
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_2").iterdir()) == [
        "meta.json",
        "model.pt",
        "optimizer.pt",
        "rank_0.pt",
        "rank_1.pt",
    ]


def test_deterministic_runs_repeat_exactly(tmp_path):
    args = [*SHORT, "train.deterministic=true", "recipe.model.dropout=0.1"]
    first = launch(args, tmp_path, run_dir=tmp_path / "first")
    second = launch(args, tmp_path, run_dir=tmp_path / "second")
    assert_ok(first)
    assert_ok(second)
    assert [m["loss"] for m in first.train_lines()] == [m["loss"] for m in second.train_lines()]
    assert relative_diff(first.model(), second.model()) == 0.0
