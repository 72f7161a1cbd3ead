"""parallel=fsdp (FSDP2 over gloo on CPU) computes what one process computes, and resumes exactly.

Every run here has the global batch of one process with micro-batch 8, fp32, 6 steps, so one
single-process reference serves them all: each step's loss and gradient norm, the evaluation over the
whole (small) eval split, and the parameters at steps 2 and 6 (gathered from the DCP shards) must agree
within 1e-5 relative. The runs stop at step 2 and resume on another world size or sharding, so the
same launches prove parity at 2 and 4 ranks (with accumulation and activation checkpointing), hybrid
sharding 2x2, pipeline 2 x FSDP 2, and resharding resume 4 -> 2 and 2 -> 4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY_GPT, assert_ok, launch, relative_diff

pytestmark = pytest.mark.dist

# The eval split is ~120 samples: ranks' shards differ by one, so some run one eval batch more than
# others, which FSDP's all-gathers survive only in lockstep (launcher/parallel/lockstep.py).
ARGS = [
    *TINY_GPT,
    "train.steps=6",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "checkpoint.every=2",
    "checkpoint.keep=5",
    "recipe.data.val_fraction=0.01",
    "train.eval_every=6",
    "train.eval_batches=0",
]
FSDP = ["parallel=fsdp"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = launch([*ARGS, "train.micro_batch_size=8"], tmp_path_factory.mktemp("reference"))
    assert_ok(result)
    return result


def assert_matches(result, reference, steps, params_at=()):
    lines = {m["step"]: m for m in result.train_lines()}
    for ref in reference.train_lines():
        if ref["step"] in steps:
            assert lines[ref["step"]]["loss"] == pytest.approx(ref["loss"], rel=TOLERANCE), ref["step"]
            assert lines[ref["step"]]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOLERANCE), ref[
                "step"
            ]
            assert lines[ref["step"]]["global_batch_size"] == 8
    for step in params_at:
        assert relative_diff(result.model(step), reference.model(step)) < TOLERANCE, step
    if 6 in steps:  # a stopped run also evaluates at its stop: compare the last step's
        [evaluated] = [m for m in result.eval_lines() if m["step"] == 6]
        [ref_eval] = reference.eval_lines()
        assert evaluated["eval_loss"] == pytest.approx(ref_eval["eval_loss"], rel=TOLERANCE)


def test_four_ranks_accumulation_checkpointing_then_resume_on_two(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*ARGS, *FSDP, "train.grad_accum_steps=2", "train.activation_checkpointing=true"]
    # A unit per block here; the resume below groups both blocks in one unit (auto): DCP's keys are
    # the parameters' names, whatever the units.
    first = launch(
        [*args, "train.micro_batch_size=1", "train.stop_at_step=2", "parallel.blocks_per_unit=1"],
        tmp_path,
        nproc=4,
        run_dir=run_dir,
    )
    assert_ok(first)
    assert "FSDP units (parallel.blocks_per_unit=1): embed, blocks.0, blocks.1, head" in first.output
    assert_matches(first, reference, steps={1, 2}, params_at=[2])
    step_2 = run_dir / "checkpoints" / "step_2"
    assert sorted(p.name for p in step_2.iterdir()) == [
        "meta.json",
        "rank_0.pt",
        "rank_1.pt",
        "rank_2.pt",
        "rank_3.pt",
        "sharded",
        "train_state.pt",
    ]
    assert len(list((step_2 / "sharded").glob("__*_*.distcp"))) == 4  # each rank wrote its shards
    meta = json.loads((step_2 / "meta.json").read_text())
    assert meta["format"] == "dcp" and "sharded/.metadata" in meta["files"]

    second = launch([*args, "train.micro_batch_size=2"], tmp_path, nproc=2, run_dir=run_dir)
    assert_ok(second)
    assert "resumed from step 2" in second.output
    assert "FSDP units (parallel.blocks_per_unit=auto): embed, blocks.0-1, head" in second.output
    assert "resuming on 2 data-parallel ranks a checkpoint saved on 4" in second.output
    assert [m["step"] for m in second.train_lines()] == [1, 2, 3, 4, 5, 6]
    assert_matches(second, reference, steps={3, 4, 5, 6}, params_at=[6])
    last = second.train_lines()[-1]
    # Bytes each rank's collectives carry per step: 2 micro-steps gather every unit for forward and all
    # but the last block and the head again for backward; one reduce-scatter of the fp32 gradients.
    numel = sum(t.numel() for t in reference.model(6).values())
    assert last["reduce_scatter_bytes"] == numel * 4
    assert numel * 4 * 2 < last["allgather_bytes"] < numel * 4 * 4
    assert "allreduce_bytes" not in last


def test_two_ranks_async_saves_then_resume_as_hybrid_two_by_two(reference, tmp_path):
    run_dir = tmp_path / "run"
    # Step 2's shards are written in the background and committed when step 4's save begins.
    first = launch(
        [*ARGS, *FSDP, "train.micro_batch_size=4", "train.stop_at_step=4", "checkpoint.async_save=true"],
        tmp_path,
        nproc=2,
        run_dir=run_dir,
    )
    assert_ok(first)
    assert (
        "writing in the background" in first.output and "step_2 (written in the background)" in first.output
    )
    assert_matches(first, reference, steps={1, 2, 3, 4}, params_at=[2, 4])
    second = launch(
        [*ARGS, *FSDP, "parallel.dp_replicate=2", "parallel.dp_shard=2", "train.micro_batch_size=2"],
        tmp_path,
        nproc=4,
        run_dir=run_dir,
    )
    assert_ok(second)
    assert "resumed from step 4" in second.output
    assert_matches(second, reference, steps={5, 6}, params_at=[6])
    last = second.train_lines()[-1]
    numel = sum(t.numel() for t in reference.model(6).values())
    assert last["allreduce_bytes"] == pytest.approx(numel * 4 / 2, rel=1e-3)  # the shard, across replicas

    # The sharded checkpoint exports to one plain model.pt (for launcher.serve and friends).
    out = tmp_path / "export"
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.export",
            str(run_dir),
            "export.quantize=none",
            f"export.out={out}",
            "export.eval_batches=1",
            "export.latency_batch_sizes=[1]",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert export.returncode == 0, export.stderr[-3000:]
    exported = torch.load(out / "model.pt", weights_only=True)
    assert relative_diff(exported, reference.model(6)) < TOLERANCE


def test_pipeline_two_stages_each_sharded_over_two(reference, tmp_path):
    result = launch(
        [
            *ARGS,
            "parallel=pipeline",
            "parallel.pp=2",
            "parallel.dp_shard=2",
            "parallel.num_microbatches=2",
            "train.micro_batch_size=4",
        ],
        tmp_path,
        nproc=4,
    )
    assert_ok(result)
    assert_matches(result, reference, steps={1, 2, 3, 4, 5, 6}, params_at=[2, 6])
    assert (result.run_dir / "checkpoints" / "step_6" / "sharded" / ".metadata").is_file()


def test_kill_during_sharded_save_leaves_the_previous_checkpoint(reference, tmp_path):
    """SIGKILL on rank 1 while DCP writes step 4's shards: step 2 stays the newest complete checkpoint,
    and a resume on the same world size continues to the uninterrupted run's numbers."""
    run_dir = tmp_path / "run"
    args = [*ARGS, *FSDP, "train.micro_batch_size=4"]
    crash = {
        "PYTHONPATH": f"{REPO / 'tests' / 'faults' / 'crash_in_save'}:{REPO}",
        "CRASH_RANK": "1",
        "CRASH_STEP": "4",
        "CRASH_PATH": "/sharded/",
    }
    crashed = launch(args, tmp_path, nproc=2, run_dir=run_dir, env=crash)
    assert crashed.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_2" / "meta.json").is_file()
    assert not (ckpts / "step_4").exists() and list((ckpts / ".tmp_step_4" / "sharded").glob("*.distcp"))
    resumed = launch(args, tmp_path, nproc=2, run_dir=run_dir)
    assert_ok(resumed)
    assert "resumed from step 2" in resumed.output
    assert_matches(resumed, reference, steps={3, 4, 5, 6}, params_at=[6])


def test_bf16_mixed_precision_trains_close_to_fp32(reference, tmp_path):
    result = launch(
        [
            *ARGS,
            *FSDP,
            "train.micro_batch_size=4",
            "precision=bf16",
            "checkpoint.every=0",
            "train.eval_every=0",
        ],
        tmp_path,
        nproc=2,
    )
    assert_ok(result)
    for line, ref in zip(result.train_lines(), reference.train_lines(), strict=True):
        assert line["loss"] == pytest.approx(ref["loss"], rel=2e-2)
    # all-gathers carry bf16 parameters: half the bytes of fp32 gradients' reduce-scatter per unit.
    last = result.train_lines()[-1]
    numel = sum(t.numel() for t in reference.model(6).values())
    assert last["reduce_scatter_bytes"] == numel * 4
    assert last["allgather_bytes"] < numel * 4


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_compiled_two_ranks_match_one_process(reference, tmp_path, checkpointed):
    """train.compile=true: each block's forward compiled (FSDP's hooks outside the graphs), checkpointed
    or not, `post` and the loss as one graph (with_loss.BodyThenCompiledTail), evaluation through the
    eager `post`."""
    result = launch(
        [
            *ARGS,
            *FSDP,
            "train.micro_batch_size=4",
            "train.compile=true",
            "checkpoint.every=6",
            f"train.activation_checkpointing={str(checkpointed).lower()}",
        ],
        tmp_path,
        nproc=2,
        timeout=900,
    )
    assert_ok(result)
    assert_matches(result, reference, steps=range(1, 7), params_at=(6,))


def test_digits_two_ranks_match_one_process(tmp_path):
    # 361 eval samples: rank 0 has 46 batches of 4, rank 1 has 45 (lockstep again).
    args = [
        "recipe=digits",
        "train.steps=4",
        "optim.lr=3e-3",
        "recipe.val_fraction=0.2009",
        "train.eval_every=4",
        "train.eval_batches=0",
        "train.log_every=1",
        "checkpoint.every=0",
        "logger.progress_bar=false",
    ]
    single = launch([*args, "train.micro_batch_size=8"], tmp_path, run_dir=tmp_path / "single")
    sharded = launch(
        [*args, *FSDP, "train.micro_batch_size=4", "train.activation_checkpointing=true"],
        tmp_path,
        nproc=2,
        run_dir=tmp_path / "fsdp",
    )
    assert_ok(single)
    assert_ok(sharded)
    for line, ref in zip(sharded.train_lines(), single.train_lines(), strict=True):
        assert line["loss"] == pytest.approx(ref["loss"], rel=TOLERANCE)
        assert line["grad_norm"] == pytest.approx(ref["grad_norm"], rel=TOLERANCE)
    [evaluated], [ref_eval] = sharded.eval_lines(), single.eval_lines()
    assert evaluated["eval_loss"] == pytest.approx(ref_eval["eval_loss"], rel=TOLERANCE)
    assert evaluated["eval_accuracy"] == pytest.approx(ref_eval["eval_accuracy"], abs=1e-6)
    assert relative_diff(sharded.model(), single.model()) < TOLERANCE
