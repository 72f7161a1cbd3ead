"""A user's recipe outside this repository runs unchanged, selected by import path."""

from __future__ import annotations

import os
import textwrap

import pytest

from tests.conftest import assert_ok, launch

pytestmark = pytest.mark.integration

USER_RECIPE = textwrap.dedent('''
    """Fit y = 3x - 1 with noise: no launcher import, no torch.distributed."""
    from dataclasses import dataclass, field

    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    @dataclass
    class ModelConfig:
        hidden: int = 16


    @dataclass
    class LineConfig:
        model: ModelConfig = field(default_factory=ModelConfig)
        n_samples: int = 512


    class LineRecipe:
        Config = LineConfig

        def __init__(self, cfg):
            self.cfg = cfg
            g = torch.Generator().manual_seed(0)
            x = torch.rand(cfg.n_samples, 1, generator=g)
            self.data = TensorDataset(x, 3 * x - 1 + 0.01 * torch.randn(x.shape, generator=g))

        def build_model(self):
            hidden = self.cfg.model.hidden
            return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

        def train_dataset(self):
            return self.data

        def eval_dataset(self):
            return self.data

        def loss(self, outputs, targets):
            return nn.functional.mse_loss(outputs, targets)
''')


def write_user_package(tmp_path) -> dict[str, str]:
    """A package `my_recipes` outside this repo; returns the environment that makes it importable."""
    package = tmp_path / "userpkg" / "my_recipes"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "line.py").write_text(USER_RECIPE)
    return {"PYTHONPATH": f"{tmp_path / 'userpkg'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_recipe_from_a_user_package(tmp_path):
    env = write_user_package(tmp_path)
    result = launch(
        [
            "recipe=my_recipes.line:LineRecipe",
            "recipe.model.hidden=8",
            "recipe.n_samples=256",
            "train.steps=150",
            "train.micro_batch_size=32",
            "optim.lr=3e-2",
            "train.eval_every=150",
            "train.log_every=20",
            "checkpoint.every=0",
        ],
        tmp_path,
        nproc=2,
        env=env,
    )
    assert_ok(result)
    assert result.eval_lines()[-1]["eval_loss"] < 0.05  # the variance of 3x - 1 on [0, 1] is 0.75
    assert "hidden: 8" in (result.run_dir / "config.yaml").read_text()
    state = result.model()
    assert state["0.weight"].shape == (8, 1)


def test_user_recipe_config_is_validated(tmp_path):
    env = write_user_package(tmp_path)
    result = launch(["recipe=my_recipes.line:LineRecipe", "recipe.model.hiden=8"], tmp_path, env=env)
    assert result.returncode == 2
    assert "recipe.model.hiden=8: unknown key (did you mean recipe.model.hidden?)" in result.stderr
