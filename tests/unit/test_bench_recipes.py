"""The bench's recurrent recipe (bench/memory_recipes.py): `recipe.cell` picks the cuDNN module."""

from __future__ import annotations

import pytest
from torch import nn

from bench.memory_recipes import LSTMConfig, LSTMRecipe
from launcher.recipe import ConfigError


def test_cell_picks_the_recurrent_module_and_rejects_unknown_names():
    small = {"hidden": 8, "n_layers": 1, "vocab_size": 16}
    gru = LSTMRecipe(LSTMConfig(cell="gru", **small)).build_model()
    two = LSTMRecipe(LSTMConfig(cell="lstm2", **small)).build_model()
    assert isinstance(gru.blocks[0].lstm, nn.GRU)
    assert isinstance(two.blocks[0].lstm, nn.LSTM) and two.blocks[0].lstm.num_layers == 2
    with pytest.raises(ConfigError, match="recipe.cell"):
        LSTMConfig(cell="lstm3")
