"""Small pieces: LR schedule, recipe layout contract, environment parsing, run ids."""

from __future__ import annotations

import pytest
import torch

from launcher.config.schema import AdamWConfig, LRSchedule
from launcher.launch.dist import DistEnv
from launcher.recipe import BlockLayout, block_layout, resolve_blocks
from launcher.train.optim import build_optimizer, lr_factor
from recipes.digits import DigitsConfig, DigitsRecipe
from recipes.gpt import GPTConfig, GPTModelConfig, GPTRecipe, TextDataConfig


def test_lr_warmup_then_cosine_to_floor():
    cfg = AdamWConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule=LRSchedule.cosine)
    factors = [lr_factor(s, 20, cfg) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert lr_factor(20, 20, cfg) == pytest.approx(0.1)
    cfg.schedule = LRSchedule.constant
    assert lr_factor(15, 20, cfg) == 1.0


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model.named_parameters(), AdamWConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


@pytest.mark.parametrize(
    "recipe,inputs",
    [
        (
            GPTRecipe(GPTConfig(model=GPTModelConfig(d_model=16, n_layers=3, n_heads=2, seq_len=8))),
            torch.randint(0, 256, (2, 8)),
        ),
        (DigitsRecipe(DigitsConfig()), torch.rand(5, 64)),
    ],
)
def test_layout_contract_model_equals_pre_blocks_post(recipe, inputs):
    """model(x) == post(blocks(pre(x))): what activation checkpointing and pipelines rely on."""
    torch.manual_seed(0)
    model = recipe.build_model()
    layout = block_layout(recipe)
    assert isinstance(layout, BlockLayout)
    x = model.get_submodule(layout.pre)(inputs)
    for block in resolve_blocks(model, layout):
        x = block(x)
    torch.testing.assert_close(model.get_submodule(layout.post)(x), model(inputs))


def test_gpt_stdlib_corpus_is_deterministic_and_split():
    recipe = GPTRecipe(GPTConfig(model=GPTModelConfig(seq_len=16), data=TextDataConfig(max_bytes=50_000)))
    train, held_out = recipe.train_dataset(), recipe.eval_dataset()
    assert len(train) > 10 * len(held_out) > 0
    x, y = train[3]
    assert torch.equal(x[1:], y[:-1])
    again = GPTRecipe(GPTConfig(model=GPTModelConfig(seq_len=16), data=TextDataConfig(max_bytes=50_000)))
    assert torch.equal(again.train_dataset()[3][0], x)


def test_gpt_bin_tokens_beyond_vocab_rejected(tmp_path):
    import numpy as np

    from launcher.errors import ConfigError

    path = tmp_path / "tokens.bin"
    np.array([1, 2, 300, 4] * 100, dtype=np.uint16).tofile(path)
    recipe = GPTRecipe(GPTConfig(model=GPTModelConfig(vocab_size=256), data=TextDataConfig(path=str(path))))
    with pytest.raises(ConfigError, match="token id 300 >= recipe.model.vocab_size=256"):
        recipe.train_dataset()


def test_dist_env_from_torchrun_slurm_or_nothing():
    torchrun = DistEnv.from_environ(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "29500",
            "TORCHELASTIC_RUN_ID": "abc",
        }
    )
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.run_id) == (3, 1, 4, "abc")
    slurm = DistEnv.from_environ(
        {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    )
    assert (slurm.rank, slurm.world_size, slurm.local_world_size, slurm.launched_by) == (5, 8, 4, "slurm")
    assert DistEnv.from_environ({"TORCHELASTIC_RUN_ID": "none"}) == DistEnv()
    assert (
        DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "none"}).run_id is None
    )
