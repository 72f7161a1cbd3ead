"""Every pipeline validation error exits 2 before training, naming the field and a fix."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_GPT, launch

pytestmark = pytest.mark.integration

PIPE = [*TINY_GPT, "parallel=pipeline", "recipe.model.n_layers=4", "train.micro_batch_size=8"]

CASES = [
    # pp not dividing the world size (2 ranks)
    ([*PIPE, "parallel.pp=3"], 2, "parallel.pp=3: does not divide world_size=2", "try parallel.pp=2"),
    ([*PIPE, "parallel.dp=2"], 2, "parallel.dp=2: dp * pp = 2 * 2 != world_size=2", "parallel.dp=1"),
    # more stages than blocks
    ([*PIPE, "recipe.model.n_layers=1"], 2, "more pipeline stages (2) than blocks (1)", "at most 1"),
    (
        [*PIPE, "parallel.schedule=interleaved_1f1b", "recipe.model.n_layers=3"],
        2,
        "more pipeline stages (4) than blocks (3)",
        "at most 3",
    ),
    # num_microbatches vs schedule and batch
    (
        [*PIPE, "parallel.num_microbatches=3"],
        2,
        "parallel.num_microbatches=3: does not divide train.micro_batch_size=8",
        "use one of [1, 2, 4, 8]",
    ),
    (
        [*PIPE, "parallel.num_microbatches=1"],
        2,
        "1f1b needs at least as many microbatches as stages (2)",
        ">=2",
    ),
    (
        [*PIPE, "parallel.schedule=zbv_zero_bubble", "parallel.num_microbatches=2"],
        2,
        "zbv_zero_bubble needs at least as many microbatches as stages (4)",
        ">=4",
    ),
    (
        [
            *PIPE,
            "parallel.schedule=interleaved_1f1b",
            "train.micro_batch_size=10",
            "parallel.num_microbatches=5",
        ],
        2,
        "needs a multiple of parallel.pp=2",
        "a multiple of 2",
    ),
    (
        [*PIPE, "parallel.schedule=gpipe", "parallel.stages_per_rank=2"],
        2,
        "gpipe runs one stage per rank",
        "interleaved_1f1b",
    ),
    # zero bubble with compile
    (
        [*PIPE, "parallel.schedule=zbv_zero_bubble", "train.compile=true"],
        2,
        "train.compile=true: zero-bubble schedules (zbv_zero_bubble) do not support torch.compile",
        "train.compile=false",
    ),
    ([*PIPE, "parallel.bucket_cap_mb=-1"], 2, "parallel.bucket_cap_mb=-1.0: must be > 0", "must be > 0"),
    # explicit split points
    ([*PIPE, "parallel.split_points=[blocks.9]"], 2, "is not a block boundary", "blocks.<i>"),
    (
        [*PIPE, "parallel.split_points=[blocks.1,blocks.2]"],
        2,
        "gives 3 stages, the schedule has 2",
        "blocks.2",
    ),
    # a recipe that declares no blocks
    (
        [
            "recipe=tests.integration.no_blocks_recipe:NoBlocks",
            "parallel=pipeline",
            "train.micro_batch_size=4",
        ],
        2,
        "recipe NoBlocks declares no blocks to split",
        "BlockLayout",
    ),
]


@pytest.mark.parametrize("overrides,nproc,message,fix", CASES, ids=[c[2][:40] for c in CASES])
def test_pipeline_config_errors(overrides, nproc, message, fix, tmp_path):
    env = {"WORLD_SIZE": str(nproc), "RANK": "0", "LOCAL_RANK": "0"}  # validation only: no group is formed
    result = launch(overrides, tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.output[-2000:]
    assert message in result.stderr
    assert fix in result.stderr
    assert "Traceback" not in result.output
