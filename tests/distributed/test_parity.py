"""Data parallelism and gradient accumulation change how a batch is computed, not what is learned.

Parameters after 5 optimizer steps must match a single-process run on the same samples (fp32):
  - 2 gloo ranks x micro-batch b      vs  1 process x micro-batch 2b
  - 1 process, grad_accum_steps=4 x b  vs  1 process x micro-batch 4b
  - 2 ranks x grad_accum_steps=2 x b   vs  1 process x micro-batch 4b   (no_sync path under DDP)
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_GPT, assert_ok, launch, relative_diff

pytestmark = pytest.mark.dist

STEPS = ["train.steps=5", "optim.warmup_steps=2", "optim.lr=3e-3"]
TOLERANCE = 1e-5


def run(tmp_path, name, nproc, micro, accum=1, extra=()):
    result = launch(
        [*TINY_GPT, *STEPS, f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}", *extra],
        tmp_path,
        nproc=nproc,
        run_dir=tmp_path / name,
    )
    assert_ok(result)
    return result


def test_ddp_two_ranks_match_one_process_with_double_batch(tmp_path):
    ddp = run(tmp_path, "ddp", nproc=2, micro=4)
    single = run(tmp_path, "single", nproc=0, micro=8)
    assert relative_diff(ddp.model(), single.model()) < TOLERANCE
    # The logged loss is the mean over ranks, i.e. the loss of the whole global batch.
    for a, b in zip(ddp.train_lines(), single.train_lines(), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["global_batch_size"] == b["global_batch_size"] == 8
    # The run before any step differs from the one after: the comparison is not vacuous.
    assert ddp.train_lines()[0]["loss"] != ddp.train_lines()[-1]["loss"]


def test_accumulation_matches_larger_micro_batch(tmp_path):
    accumulated = run(tmp_path, "accum", nproc=0, micro=2, accum=4)
    single = run(tmp_path, "single", nproc=0, micro=8)
    assert relative_diff(accumulated.model(), single.model()) < TOLERANCE
    assert accumulated.train_lines()[-1]["global_batch_size"] == 8


def test_ddp_with_accumulation_matches_one_process(tmp_path):
    ddp = run(tmp_path, "ddp_accum", nproc=2, micro=2, accum=2)
    single = run(tmp_path, "single", nproc=0, micro=8)
    assert relative_diff(ddp.model(), single.model()) < TOLERANCE
