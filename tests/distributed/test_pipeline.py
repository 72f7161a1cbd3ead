"""Pipeline parallelism computes what one process computes, for every schedule, with and without DP.

Each run trains 3 steps of a 4-block GPT (fp32) and is compared with a single-process run on the
same global batch: the loss of every step, the final evaluation, and the final parameters (the union
of the stages' checkpoint shards, which use the whole model's parameter names) within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_GPT, assert_ok, launch, relative_diff

pytestmark = pytest.mark.dist

SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble"]
# Evaluation at the end (every schedule evaluates: torch's schedule.eval once crashed under ZBV).
ARGS = [
    *TINY_GPT,
    "recipe.model.n_layers=4",
    "train.steps=3",
    "optim.lr=3e-3",
    "optim.warmup_steps=1",
    "train.eval_every=3",
    "train.eval_batches=2",
]
PER_RANK_BATCH = 8  # split into 4 microbatches
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Single-process runs with the global batch of the dp=1 and dp=2 layouts."""
    refs = {}
    for dp in (1, 2):
        tmp = tmp_path_factory.mktemp(f"reference_dp{dp}")
        result = launch([*ARGS, f"train.micro_batch_size={PER_RANK_BATCH * dp}"], tmp)
        assert_ok(result)
        refs[dp] = result
    return refs


def pipeline_params(result, pp: int) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for k in range(pp):
        shard = result.model(name=f"model_pp{k}.pt")
        assert not params.keys() & shard.keys()  # stages hold disjoint parameters
        params.update(shard)
    return params


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("nproc,dp", [(2, 1), (4, 2)], ids=["pp2", "pp2xdp2"])
def test_pipeline_matches_single_process(schedule, nproc, dp, references, tmp_path):
    result = launch(
        [
            *ARGS,
            "parallel=pipeline",
            "parallel.pp=2",
            f"parallel.schedule={schedule}",
            "parallel.num_microbatches=4",
            f"train.micro_batch_size={PER_RANK_BATCH}",
        ],
        tmp_path,
        nproc=nproc,
    )
    assert_ok(result)
    reference = references[dp]
    assert relative_diff(pipeline_params(result, pp=2), reference.model()) < TOLERANCE
    lines, ref_lines = result.train_lines(), reference.train_lines()
    assert [m["step"] for m in lines] == [1, 2, 3]
    for line, ref in zip(lines, ref_lines, strict=True):
        assert line["loss"] == pytest.approx(ref["loss"], rel=TOLERANCE)
        assert line["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOLERANCE)  # global over stages
        assert line["global_batch_size"] == PER_RANK_BATCH * dp
    [evaluated], [ref_eval] = result.eval_lines(), reference.eval_lines()
    assert evaluated["eval_loss"] == pytest.approx(ref_eval["eval_loss"], rel=TOLERANCE)


def test_pipeline_resume_equals_uninterrupted(tmp_path):
    args = [
        *TINY_GPT,
        "recipe.model.n_layers=4",
        "recipe.model.dropout=0.1",
        "train.steps=8",
        "optim.warmup_steps=2",
        "parallel=pipeline",
        "parallel.num_microbatches=2",
        "train.micro_batch_size=4",
        "train.eval_every=4",
    ]
    straight = launch(args, tmp_path, nproc=2, run_dir=tmp_path / "straight")
    assert_ok(straight)
    assert_ok(launch([*args, "train.stop_at_step=4"], tmp_path, nproc=2, run_dir=tmp_path / "resumed"))
    resumed = launch(args, tmp_path, nproc=2, run_dir=tmp_path / "resumed")
    assert_ok(resumed)
    assert "resumed from step 4" in resumed.output
    a, b = pipeline_params(resumed, 2), pipeline_params(straight, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in resumed.train_lines()] == [m["loss"] for m in straight.train_lines()]
    assert [m["eval_loss"] for m in resumed.eval_lines()] == [m["eval_loss"] for m in straight.eval_lines()]
    assert sorted(p.name for p in (resumed.run_dir / "checkpoints" / "step_8").iterdir()) == [
        "meta.json",
        "model_pp0.pt",
        "model_pp1.pt",
        "optimizer_pp0.pt",
        "optimizer_pp1.pt",
        "rank_0.pt",
        "rank_1.pt",
    ]


def test_resume_refuses_a_different_parallel_layout(tmp_path):
    args = [*TINY_GPT, "recipe.model.n_layers=4", "train.steps=4", "train.micro_batch_size=4"]
    assert_ok(
        launch(
            [*args, "parallel=pipeline", "parallel.num_microbatches=2", "train.stop_at_step=2"],
            tmp_path,
            nproc=2,
        )
    )
    result = launch([*args, "parallel=ddp"], tmp_path, nproc=2)
    assert result.returncode != 0  # torchrun itself exits 1 when its workers fail; they exit 2
    assert "exitcode  : 2" in result.output
    assert (
        "was saved with `parallel=pipeline parallel.pp=2 parallel.schedule=1f1b parallel.stages_per_rank=1`"
        in result.output
    )
    assert "remove" not in result.output


def test_pipeline_with_accumulation_bf16_clipping_and_activation_checkpointing(tmp_path):
    """Accumulation over schedule steps keeps the gradient a mean; bf16 and recompute still train."""
    args = [*ARGS, "optim.grad_clip=0.5"]
    accumulated = launch(
        [
            *args,
            "parallel=pipeline",
            "parallel.num_microbatches=2",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=2",
            "train.activation_checkpointing=true",
        ],
        tmp_path,
        nproc=2,
        run_dir=tmp_path / "pp",
    )
    single = launch([*args, "train.micro_batch_size=8"], tmp_path, run_dir=tmp_path / "single")
    assert_ok(accumulated)
    assert_ok(single)
    assert relative_diff(pipeline_params(accumulated, 2), single.model()) < TOLERANCE
    bf16 = launch(
        [
            *args,
            "parallel=pipeline",
            "parallel.num_microbatches=2",
            "train.micro_batch_size=4",
            "precision=bf16",
        ],
        tmp_path,
        nproc=2,
        run_dir=tmp_path / "bf16",
    )
    assert_ok(bf16)
    assert bf16.train_lines()[-1]["loss"] == pytest.approx(single.train_lines()[-1]["loss"], rel=2e-2)


def test_pipeline_fp16_skips_together_on_every_stage(tmp_path):
    """An overflow on any stage skips the step on all stages, as in one process."""
    args = [*ARGS, "train.steps=6", "precision=fp16", "precision.init_scale=1099511627776"]
    piped = launch(
        [*args, "parallel=pipeline", "parallel.num_microbatches=2", "train.micro_batch_size=8"],
        tmp_path,
        nproc=2,
        run_dir=tmp_path / "pp",
    )
    single = launch([*args, "train.micro_batch_size=8"], tmp_path, run_dir=tmp_path / "single")
    assert_ok(piped)
    assert_ok(single)
    piped_lines, single_lines = piped.train_lines(), single.train_lines()
    assert [m["skipped_steps"] for m in piped_lines] == [m["skipped_steps"] for m in single_lines]
    assert piped_lines[-1]["skipped_steps"] >= 1
    assert [m["loss_scale"] for m in piped_lines] == [m["loss_scale"] for m in single_lines]
    assert piped_lines[-1]["loss"] == pytest.approx(single_lines[-1]["loss"], rel=1e-2)
