"""Bad parallel=fsdp (and pipeline dp_shard) settings are config errors: exit 2, the field, a fix."""

from __future__ import annotations

import pytest

from launcher.config import cli
from launcher.errors import ConfigError
from tests.conftest import TINY_GPT, launch

pytestmark = pytest.mark.integration

FSDP = [*TINY_GPT, "parallel=fsdp", "train.micro_batch_size=4"]
PIPE = [*TINY_GPT, "parallel=pipeline", "train.micro_batch_size=4", "parallel.num_microbatches=2"]
# A 206B-parameter GPT on the meta device: its offloaded AdamW shards (~3 TB) fit no host.
HUGE = ["recipe.model.d_model=16384", "recipe.model.n_layers=64", "recipe.model.n_heads=64"]

CASES = [
    (
        [*FSDP, "parallel.dp_shard=3"],
        4,
        "parallel.dp_shard=3: dp_replicate x dp_shard = 1 x 3 != 4",
        "dp_shard=4",
    ),
    ([*FSDP, "parallel.dp_replicate=3"], 4, "parallel.dp_replicate=3: does not divide the 4", "[1, 2, 4]"),
    ([*FSDP, "parallel.dp_replicate=2", "parallel.dp_shard=1"], 4, "2 x 1 != 4", "parallel.dp_shard=2"),
    (
        [*FSDP, "comm_hook=powersgd"],
        2,
        "comm_hook=powersgd: is not supported with parallel=fsdp",
        "comm_hook=none",
    ),
    (
        [*FSDP, "comm_hook=bf16"],
        2,
        "comm_hook=bf16: is not supported with parallel=fsdp",
        "reduce_dtype=bf16",
    ),
    (
        [*FSDP, *HUGE, "parallel.offload=true"],
        2,
        "parallel.offload=True: the 1 rank(s) on this node would keep",
        "parallel.offload=false",
    ),
    ([*FSDP, "parallel.blocks_per_unit=0"], 2, "parallel.blocks_per_unit=0: must be a whole number", "auto"),
    ([*PIPE, "parallel.dp_shard=3"], 4, "parallel.dp_shard=3: does not divide parallel.dp=2", "[1, 2]"),
    (
        [*PIPE, "parallel.dp_shard=2", "comm_hook=fp16"],
        4,
        "is not supported with parallel.dp_shard=2",
        "comm_hook=none",
    ),
]


@pytest.mark.parametrize("overrides,world_size,message,fix", CASES, ids=[c[2][:40] for c in CASES])
def test_fsdp_config_errors_name_the_field(overrides, world_size, message, fix):
    request = cli.parse_argv(overrides)
    cli.register_all(request.overrides)
    with pytest.raises(ConfigError) as err:
        cli.compose_jobs(request, world_size)
    assert message in str(err.value)
    assert fix in str(err.value)


@pytest.mark.parametrize(
    "extra", [["comm_hook=powersgd"], [*HUGE, "parallel.offload=true"]], ids=["powersgd", "offload"]
)
def test_fsdp_config_error_exits_2_without_traceback(extra, tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}  # validation only
    result = launch([*FSDP, *extra], tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.output[-2000:]
    assert "launcher: invalid config:" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()
