"""The memory estimate of parallel=fsdp and of pipeline stages sharded with parallel.dp_shard."""

from __future__ import annotations

import copy

import pytest
import torch

from launcher.config.schema import FSDPDtype, Precision
from launcher.memory.estimate import estimate
from tests.unit.test_memory_estimate import PIPE, TINY, compose, round512

FSDP = [*TINY, "parallel=fsdp", "train.micro_batch_size=16"]


@pytest.fixture(scope="module")
def job():
    return compose(FSDP, 8)  # composing is slow: the tests change copies of this config


def rank(job, world_size=8, **changes):
    cfg = copy.deepcopy(job.cfg)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    est = estimate(cfg, job.recipe_class, world_size, "H100")
    assert len(est.ranks) == 1 and est.ranks[0].ranks == "every rank"
    r = est.ranks[0]
    assert r.peak_allocated == sum(r.parts.values())
    return est, r


def test_states_are_sharded_and_units_gathered(job):
    est, eight = rank(job)
    _, one = rank(job, world_size=1)
    assert est.layout == "fsdp dp_shard=8 dp_replicate=1"
    recipe = job.recipe_class(job.cfg.recipe)
    params = sum(round512(p.nbytes) for p in recipe.build_model().parameters())
    assert one.parts["parameters (shard)"] == params
    assert eight.parts["parameters (shard)"] == pytest.approx(params / 8, rel=0.01)
    assert eight.parts["optimizer state (shard)"] == pytest.approx(
        one.parts["optimizer state (shard)"] / 8, rel=0.01
    )
    assert eight.parts["all-gathered parameters (in flight)"] > 0
    assert eight.parts["activations"] == one.parts["activations"]  # the same micro-batch per rank
    assert eight.peak_allocated < one.peak_allocated
    assert eight.notes["sharding"] == "dp_shard=8 x dp_replicate=1"


def test_knobs_move_the_sharded_estimate_the_right_way(job):
    _, base = rank(job)
    _, zero2 = rank(job, parallel__reshard_after_forward=False)
    assert (
        zero2.parts["all-gathered parameters (in flight)"] > base.parts["all-gathered parameters (in flight)"]
    )
    _, offload = rank(job, parallel__offload=True)
    assert "parameters (shard)" not in offload.parts or offload.parts["parameters (shard)"] == 0
    assert offload.notes["host bytes per rank (offloaded states)"] > 0
    _, bf16 = rank(job, precision__dtype=Precision.bf16)
    _, bf16_fp32_params = rank(job, precision__dtype=Precision.bf16, parallel__param_dtype=FSDPDtype.fp32)
    assert bf16.parts.get("autocast weight copies", 0) == 0  # parameters are gathered in bf16 already
    assert (
        bf16.parts["all-gathered parameters (in flight)"]
        < bf16_fp32_params.parts["all-gathered parameters (in flight)"]
    )
    _, hybrid = rank(job, parallel__dp_replicate=2, parallel__dp_shard=4)
    assert hybrid.parts["parameters (shard)"] == pytest.approx(2 * base.parts["parameters (shard)"], rel=0.02)


def test_accumulation_keeps_gradients_whole_unless_reduced_every_micro_step(job):
    _, accumulating = rank(job, train__micro_batch_size=8, train__grad_accum_steps=2)
    _, reducing = rank(
        job, train__micro_batch_size=8, train__grad_accum_steps=2, parallel__reduce_every_micro_step=True
    )
    whole = accumulating.parts.get("gradients (unsharded, accumulating)", 0)
    assert whole > 4 * reducing.parts.get("gradients (shard)", 0)


def test_pipeline_stages_sharded_over_dp_shard():
    plain = compose([*TINY, *PIPE], 4)
    sharded = compose([*TINY, *PIPE, "parallel.dp_shard=2"], 4)
    a = estimate(plain.cfg, plain.recipe_class, 4, "H100")
    b = estimate(sharded.cfg, sharded.recipe_class, 4, "H100")
    for r_plain, r_sharded in zip(a.ranks, b.ranks, strict=True):
        assert r_sharded.parts["parameters"] == pytest.approx(r_plain.parts["parameters"] / 2, abs=512)
        assert r_sharded.parts["all-gathered parameters (in flight)"] > 0
        assert r_sharded.peak_allocated == sum(r_sharded.parts.values())


def test_estimate_command_shows_per_rank_sharded_parts_and_suggests_fsdp(capsys):
    from launcher.memory.estimate_cli import main

    assert main([*FSDP, "estimate.world_size=8"]) == 0
    out = capsys.readouterr().out
    assert "memory estimate: fsdp dp_shard=8 dp_replicate=1, per rank, GiB" in out
    for part in ("parameters (shard)", "optimizer state (shard)", "all-gathered parameters (in flight)"):
        assert part in out
    # A DDP run too big for its GPU is offered sharding among the fixes, with its estimated saving.
    big = [o for o in TINY if not o.startswith("train.micro_batch_size")]
    big += [
        "recipe.model.d_model=256",
        "recipe.model.n_heads=4",
        "train.micro_batch_size=1",
        "estimate.world_size=8",
    ]
    assert main([*big, "estimate.gpu=0.66"]) == 5
    assert "parallel=fsdp comm_hook=none    ->" in capsys.readouterr().out


def test_one_rank_shard_group_never_reshards(job):
    """dp_shard=1 holds whole parameters: the estimate (and the strategy) keep gathered units."""
    from launcher.parallel.fsdp import ShardDims, reshards_after_forward

    assert reshards_after_forward(True, ShardDims(1, 8))
    assert not reshards_after_forward(False, ShardDims(1, 8))
    assert not reshards_after_forward(True, ShardDims(4, 1))
    _, one = rank(job, world_size=1)
    _, one_zero2 = rank(job, world_size=1, parallel__reshard_after_forward=False)
    assert one.parts == one_zero2.parts
    _, eight = rank(job)
    _, eight_zero2 = rank(job, parallel__reshard_after_forward=False)
    assert eight.parts != eight_zero2.parts


def test_sharded_trace_gives_the_allocator_shards():
    """The allocator replay of a sharded step sees each sharded tensor at its shard's size, and a
    gradient, once accumulated, as the whole tensor freed and its shard allocated."""
    from launcher.memory.fsdp import ShardedLiveBytes
    from launcher.memory.step_trace import fake_mode

    with fake_mode():
        tracker = ShardedLiveBytes({"parameters": 1 / 8, "gradients": 1 / 8})
        weight = torch.empty(1024, 1024)
        tracker.register(weight, "parameters")
        with tracker:
            tracker.phase = "backward"
            grad = weight * 2  # created in backward at full size, then accumulated as a gradient
            tracker.register(grad, "gradients")
    full = 1024 * 1024 * 4
    serial_w, serial_g = tracker.serial_of(weight), tracker.serial_of(grad)
    assert tracker.events == [
        (serial_w, full // 8),
        (serial_g, full),
        (serial_g, 0),
        (serial_g, full // 8),
    ]


def test_sharded_reserved_comes_from_the_replay(job):
    _, r = rank(job)
    _, checkpointed = rank(job, train__activation_checkpointing=True)
    for x in (r, checkpointed):
        assert x.peak_reserved - x.peak_allocated == x.reserved_extra[True] > 0
    assert checkpointed.reserved_extra[True] != r.reserved_extra[True]


def test_larger_units_gather_more_at_once(job):
    _, per_block = rank(job, parallel__blocks_per_unit=1)
    est, grouped = rank(job, parallel__blocks_per_unit=2)
    assert (
        grouped.notes["FSDP units (all-gathered one by one)"]
        < per_block.notes["FSDP units (all-gathered one by one)"]
    )
    assert (
        grouped.notes["largest unit GiB (param_dtype)"] >= per_block.notes["largest unit GiB (param_dtype)"]
    )
    assert (
        grouped.parts["all-gathered parameters (in flight)"]
        > per_block.parts["all-gathered parameters (in flight)"]
    )
