"""Cutting a recipe's model into pipeline stages along its declared blocks.

A stage is `pre` (first stage only) + a contiguous run of blocks + `post` (last stage only). The
parts a rank holds are re-registered under their original names, so its state dict uses the same
keys as the whole model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from launcher.errors import ConfigError
from launcher.recipe import BlockLayout, resolve_blocks


@dataclass(frozen=True)
class StageSpec:
    index: int
    blocks: tuple[int, ...]
    pre: bool
    post: bool


def compute_weight(module: nn.Module) -> int:
    """Parameters that do arithmetic: embedding tables are lookups and count zero."""
    lookups = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in lookups)


def balanced_starts(weights: Sequence[int], num_stages: int, pre: int = 0, post: int = 0) -> list[int]:
    """First block of each stage, minimising the heaviest stage (pre on the first, post on the last).

    Exact contiguous partition by dynamic programming: O(stages * blocks^2), trivial at these sizes.
    """
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def load(i: int, j: int, stage: int) -> int:  # blocks [i, j) as stage `stage`
        return prefix[j] - prefix[i] + (pre if stage == 0 else 0) + (post if stage == num_stages - 1 else 0)

    inf = float("inf")
    # best[s][j]: lowest max-load of splitting blocks [0, j) into stages 0..s-1
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], load(i, j, s - 1))
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    starts, j = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][j]
        starts.append(j)
    return starts[::-1]


def plan_stages(
    model: nn.Module, layout: BlockLayout, num_stages: int, split_points: Sequence[str]
) -> list[StageSpec]:
    """The blocks of every stage. Raises ConfigError for bad split points or parameters off the layout."""
    blocks = resolve_blocks(model, layout)
    n = len(blocks)
    parts = [model.get_submodule(layout.pre), blocks, model.get_submodule(layout.post)]
    in_parts = {id(p) for part in parts for p in part.parameters()}
    outside = [name for name, p in model.named_parameters() if id(p) not in in_parts]
    if outside:
        raise ConfigError(
            "recipe",
            type(model).__name__,
            f"has parameters outside layout pre/blocks/post: {', '.join(outside[:5])}",
            "move them into the pre, blocks or post modules the recipe's layout names",
        )
    if num_stages > n:
        raise ConfigError(
            "parallel.pp",
            num_stages,
            f"more pipeline stages ({num_stages}) than blocks ({n})",
            f"use at most {n} stages (parallel.pp x stages per rank)",
        )
    if split_points:
        starts = [0] + [_block_index(point, layout.blocks, n) for point in split_points]
        if len(starts) != num_stages:
            raise ConfigError(
                "parallel.split_points",
                list(split_points),
                f"gives {len(starts)} stages, the schedule has {num_stages}",
                f"list {num_stages - 1} boundaries, e.g. {_example(layout.blocks, n, num_stages)}",
            )
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ConfigError(
                "parallel.split_points", list(split_points), "must be increasing, and no stage may be empty"
            )
    else:
        weights = [compute_weight(b) for b in blocks]
        starts = balanced_starts(weights, num_stages, compute_weight(parts[0]), compute_weight(parts[2]))
    ends = starts[1:] + [n]
    return [
        StageSpec(s, tuple(range(a, b)), s == 0, s == num_stages - 1)
        for s, (a, b) in enumerate(zip(starts, ends))
    ]


def stage_ids_for_rank(pp_rank: int, pp: int, stages_per_rank: int, v_shape: bool) -> list[int]:
    """Stages a rank runs: round-robin (loop) for interleaved schedules, V-shape for ZBV."""
    if v_shape:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


class ModelPart(nn.Module):
    """The parts of the model this rank holds, registered under their original names."""

    def __init__(self, model: nn.Module, layout: BlockLayout, specs: Sequence[StageSpec]) -> None:
        super().__init__()
        blocks = resolve_blocks(model, layout)
        if any(s.pre for s in specs):
            _attach(self, layout.pre, model.get_submodule(layout.pre))
        _attach(self, layout.blocks, nn.ModuleDict({str(i): blocks[i] for s in specs for i in s.blocks}))
        if any(s.post for s in specs):
            _attach(self, layout.post, model.get_submodule(layout.post))


class StageModule(nn.Module):
    """One pipeline stage's forward: pre (if first), its blocks in order, post (if last)."""

    def __init__(self, part: ModelPart, layout: BlockLayout, spec: StageSpec) -> None:
        super().__init__()
        held = part.get_submodule(layout.blocks)
        self.pre = part.get_submodule(layout.pre) if spec.pre else None
        self.blocks = nn.ModuleList(held[str(i)] for i in spec.blocks)
        self.post = part.get_submodule(layout.post) if spec.post else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            x = self.pre(x)
        for block in self.blocks:
            x = block(x)
        return self.post(x) if self.post is not None else x


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    *parents, leaf = dotted.split(".")
    node = root
    for name in parents:
        if not hasattr(node, name):
            node.add_module(name, nn.Module())
        node = getattr(node, name)
    node.add_module(leaf, module)


def _block_index(point: str, prefix: str, n: int) -> int:
    head, _, index = point.rpartition(".")
    if head != prefix or not index.isdigit() or not 0 < int(index) < n:
        raise ConfigError(
            "parallel.split_points",
            point,
            f"is not a block boundary: use {prefix}.<i> with 0 < i < {n}",
            f"e.g. parallel.split_points={_example(prefix, n, 2)}",
        )
    return int(index)


def _example(prefix: str, n: int, stages: int) -> str:
    return "[" + ",".join(f"{prefix}.{n * k // stages}" for k in range(1, stages)) + "]"
