"""train.compile=true compiles the model together with the recipe's loss (launcher/parallel/with_loss.py;
the pipeline compiles its blocks and, on the last stage, the loss). It must learn what eager learns:
under DDP with no_sync accumulation, and under a pipeline; and a compiled run that stops and resumes
must continue bit for bit like one that never stopped."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_GPT, assert_ok, launch, relative_diff

pytestmark = pytest.mark.dist

STEPS = ["train.steps=4", "optim.warmup_steps=1", "optim.lr=3e-3", "train.micro_batch_size=2"]
COMPILED = ["train.compile=true"]
TOLERANCE = 1e-4  # Inductor's fused kernels sum in another order than eager's


def run(tmp_path, name, extra=(), timeout=600):
    result = launch([*TINY_GPT, *STEPS, *extra], tmp_path, nproc=2, run_dir=tmp_path / name, timeout=timeout)
    assert_ok(result)
    return result


def test_compiled_ddp_with_accumulation_learns_what_eager_learns_and_resumes_bit_exactly(tmp_path):
    accum = ["train.grad_accum_steps=2", "checkpoint.every=2"]
    eager = run(tmp_path, "eager", [*accum, "train.compile=false"])
    compiled = run(tmp_path, "compiled", [*accum, *COMPILED])
    for a, b in zip(eager.train_lines(), compiled.train_lines(), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=TOLERANCE)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=TOLERANCE)
    assert relative_diff(compiled.model(), eager.model()) < TOLERANCE
    assert compiled.model().keys() == eager.model().keys()  # parameter names as the recipe has them
    assert eager.train_lines()[0]["loss"] != eager.train_lines()[-1]["loss"]  # it trained

    stopped = run(tmp_path, "resumed", [*accum, *COMPILED, "train.stop_at_step=2"])
    assert [m["step"] for m in stopped.train_lines()] == [1, 2]
    resumed = run(tmp_path, "resumed", [*accum, *COMPILED])
    full = {k: v for k, v in compiled.model().items()}
    assert all((resumed.model()[k] == v).all() for k, v in full.items())
    assert [m["loss"] for m in resumed.train_lines()] == [m["loss"] for m in compiled.train_lines()]
    assert "first step took" in compiled.output  # the compile time is said once


def test_compiled_pipeline_learns_what_eager_learns(tmp_path):
    pipe = ["parallel=pipeline", "parallel.pp=2", "parallel.num_microbatches=2"]
    eager = run(tmp_path, "eager", [*pipe, "train.compile=false"])
    compiled = run(tmp_path, "compiled", [*pipe, *COMPILED])
    for a, b in zip(eager.train_lines(), compiled.train_lines(), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=TOLERANCE)
    for shard in ("model_pp0.pt", "model_pp1.pt"):
        assert relative_diff(compiled.model(name=shard), eager.model(name=shard)) < TOLERANCE
