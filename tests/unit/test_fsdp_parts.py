"""FSDP's pieces in one process: degrees, dtypes, byte counts, and a DCP index that cannot run code."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from launcher.config.schema import FSDPDtype, Precision, PrecisionConfig
from launcher.errors import ConfigError
from launcher.parallel.fsdp import UNIT_PARAMS, FSDPCommStats, ShardDims, mp_policy, plan_units
from launcher.recipe import BlockLayout
from launcher.train.checkpoint import CheckpointError
from launcher.train.sharded_checkpoint import SHARDED_DIR, SafePlanner, saved_shapes


def test_shard_dims_fill_in_and_refuse():
    assert ShardDims.resolve(1, -1, 8) == ShardDims(1, 8)
    assert ShardDims.resolve(2, -1, 8) == ShardDims(2, 4)
    assert ShardDims.resolve(2, 4, 8).mesh_shape() == ((2, 4), ("dp_replicate", "dp_shard"))
    assert ShardDims.resolve(1, 8, 8).mesh_shape() == ((8,), ("dp_shard",))
    with pytest.raises(ConfigError, match="parallel.dp_shard=3"):
        ShardDims.resolve(1, 3, 8)
    with pytest.raises(ConfigError, match="parallel.dp_replicate=3"):
        ShardDims.resolve(3, -1, 8)


def test_mixed_precision_follows_precision_unless_set():
    def policy(precision, param=FSDPDtype.auto, reduce=FSDPDtype.auto):
        p = mp_policy(PrecisionConfig(dtype=Precision(precision)), param, reduce)
        return p.param_dtype, p.reduce_dtype

    assert policy("fp32") == (None, None)
    assert policy("bf16") == (torch.bfloat16, torch.float32)
    assert policy("fp16") == (torch.float16, torch.float32)
    assert policy("fp8") == (torch.bfloat16, torch.float32)
    assert policy("bf16", reduce=FSDPDtype.bf16) == (torch.bfloat16, torch.bfloat16)
    assert policy("fp32", param=FSDPDtype.bf16) == (torch.bfloat16, torch.float32)


def test_comm_bytes_per_step():
    numels = {"root": 0, "pre": 100, "blocks.0": 50, "blocks.1": 50, "post": 100}
    policy = mp_policy(PrecisionConfig(dtype=Precision.bf16), FSDPDtype.auto, FSDPDtype.auto)
    # ZeRO-3, 2 micro-steps, accumulate unsharded: gather all (300) + the resharded ones (150) per
    # micro-step in bf16; one fp32 reduce-scatter of everything.
    stats = FSDPCommStats(numels, {"pre", "blocks.0"}, ShardDims(1, 4), policy, 2, False)
    assert stats.step() == {"allgather_bytes": 2 * 450 * 2, "reduce_scatter_bytes": 300 * 4}
    hybrid = FSDPCommStats(numels, set(), ShardDims(2, 4), policy, 2, True)
    assert hybrid.step() == {
        "allgather_bytes": 2 * 300 * 2,
        "reduce_scatter_bytes": 2 * 300 * 4,
        "allreduce_bytes": 2 * 75 * 4,  # each group's shard, across the 2 replicas
    }
    assert FSDPCommStats(numels, set(), ShardDims(2, 1), policy, 1, False).step()["allgather_bytes"] == 0


class Stack(torch.nn.Module):
    """pre, 7 blocks of 1000 + 10 parameters each, post, and a parameter of the root's own."""

    def __init__(self, width: int = 1000, widths: list[int] | None = None) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(10, 10)
        widths = widths or [width] * 7
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(w, 1, bias=False) for w in widths)
        self.post = torch.nn.Linear(10, 1)
        self.scale = torch.nn.Parameter(torch.ones(3))


LAYOUT = BlockLayout(pre="pre", blocks="blocks", post="post")


def test_units_group_consecutive_blocks_and_the_last_keeps_its_parameters():
    model = Stack()
    units = plan_units(model, LAYOUT, reshard_after_forward=True, blocks_per_unit=3)
    assert [u.name for u in units] == ["root", "pre", "blocks.0-2", "blocks.3-5", "blocks.6", "post"]
    assert [len(u.modules) for u in units] == [1, 1, 3, 3, 1, 1]
    assert units[2].modules == tuple(model.blocks[:3])
    assert [u.numel for u in units] == [3, 110, 3000, 3000, 1000, 11]  # the root owns only `scale`
    assert [u.reshards for u in units] == [False, True, True, True, False, False]
    per_block = plan_units(model, LAYOUT, reshard_after_forward=True, blocks_per_unit=1)
    assert [u.name for u in per_block][2:9] == [f"blocks.{i}" for i in range(7)]
    assert sum(u.numel for u in per_block) == sum(u.numel for u in units) == 7124


def test_auto_units_hold_the_threshold_in_the_fewest_blocks():
    def names(width, widths=None):
        with torch.device("meta"):  # parameter counts only
            model = Stack(width, widths)
        return [u.name for u in plan_units(model, LAYOUT, False, "auto")][2:-1]

    third = -(-UNIT_PARAMS // 3)  # three blocks reach the threshold, two do not
    assert names(third) == ["blocks.0-2", "blocks.3-5", "blocks.6"]
    assert names(UNIT_PARAMS) == [f"blocks.{i}" for i in range(7)]  # large blocks: one each
    assert names(10) == ["blocks.0-6"]  # tiny ones: all in one unit
    half = UNIT_PARAMS // 2  # blocks of different sizes: units of different lengths
    assert names(0, [half, half, UNIT_PARAMS, 10, 10, half, half + 1]) == [
        "blocks.0-1",
        "blocks.2",
        "blocks.3-6",
    ]


class Exploit:
    def __reduce__(self):
        return (print, ("PWNED",))


def test_a_planted_checkpoint_index_is_refused_not_unpickled(tmp_path: Path, capsys):
    index = tmp_path / SHARDED_DIR / ".metadata"
    index.parent.mkdir()
    index.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="refused to load .*builtins.print is not allowed"):
        saved_shapes(tmp_path)
    assert "PWNED" not in capsys.readouterr().out


def test_non_tensor_values_load_with_weights_only():
    planner = SafePlanner(flatten_state_dict=False)
    planner.state_dict = {}

    class Item:
        class dest_index:  # noqa: N801 - the shape of DCP's ReadItem
            fqn = "optim.param_groups"

    safe = io.BytesIO()
    torch.save([{"lr": 0.1, "betas": (0.9, 0.95)}], safe)
    safe.seek(0)
    planner.load_bytes(Item, safe)
    assert planner.state_dict["optim.param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.95)}]
    evil = io.BytesIO(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(Item, evil)
