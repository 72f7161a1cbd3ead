"""Stage planning: balanced by compute weight, explicit split points, original parameter names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.errors import ConfigError
from launcher.parallel.split import (
    ModelPart,
    StageModule,
    balanced_starts,
    compute_weight,
    plan_stages,
    stage_ids_for_rank,
)
from recipes.gpt import GPTConfig, GPTModelConfig, GPTRecipe


def gpt(n_layers=6, vocab=256):
    recipe = GPTRecipe(
        GPTConfig(model=GPTModelConfig(n_layers=n_layers, d_model=16, n_heads=2, seq_len=8, vocab_size=vocab))
    )
    torch.manual_seed(0)
    return recipe, recipe.build_model()


def test_balanced_starts_minimises_the_heaviest_stage():
    assert balanced_starts([1] * 8, 2) == [0, 4]
    assert balanced_starts([1] * 8, 4) == [0, 2, 4, 6]
    # A heavy head on the last stage pushes blocks to the first: loads 5 vs 3 + 2.
    assert balanced_starts([1] * 8, 2, post=2) == [0, 5]
    assert balanced_starts([5, 1, 1, 1, 1, 1], 2) == [0, 1]


def test_embeddings_weigh_nothing_and_the_head_weighs_its_matmul():
    recipe, model = gpt(n_layers=12, vocab=50304)
    assert compute_weight(model.embed) == 0
    assert compute_weight(model.head) > 5 * compute_weight(model.blocks[0])
    specs = plan_stages(model, recipe.layout, 2, [])
    assert specs[0].pre and not specs[0].post and specs[1].post
    assert len(specs[0].blocks) > len(specs[1].blocks)  # the head's stage gets fewer blocks


def test_explicit_split_points():
    recipe, model = gpt(n_layers=6)
    specs = plan_stages(model, recipe.layout, 3, ["blocks.2", "blocks.5"])
    assert [s.blocks for s in specs] == [(0, 1), (2, 3, 4), (5,)]
    with pytest.raises(ConfigError, match="must be increasing"):
        plan_stages(model, recipe.layout, 3, ["blocks.4", "blocks.2"])


def test_stage_ids_loop_and_v_shape():
    assert stage_ids_for_rank(1, 4, 2, v_shape=False) == [1, 5]
    assert stage_ids_for_rank(1, 4, 2, v_shape=True) == [1, 6]


def test_parts_keep_names_and_stages_compose_to_the_model():
    recipe, model = gpt(n_layers=4)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    specs = plan_stages(model, recipe.layout, 2, [])
    parts = [ModelPart(model, recipe.layout, [spec]) for spec in specs]
    merged = {**parts[0].state_dict(), **parts[1].state_dict()}
    assert merged.keys() == reference.keys()
    x = torch.randint(0, 256, (2, 8))
    out = x
    for part, spec in zip(parts, specs):
        out = StageModule(part, recipe.layout, spec)(out)
    torch.testing.assert_close(out, model(x))


def test_parameters_outside_the_layout_are_refused():
    recipe, model = gpt(n_layers=2)
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="outside layout pre/blocks/post: extra.weight"):
        plan_stages(model, recipe.layout, 2, [])
