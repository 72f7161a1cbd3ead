"""Recipes that go wrong the ways users' recipes do, and ones that use streaming and dict samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from launcher.recipe import BlockLayout


@dataclass
class OddConfig:
    width: int = 4

    def __post_init__(self) -> None:
        if self.width % 2:
            raise ValueError(f"width={self.width} must be even")


class Stack(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(4))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Regression:
    """A well-behaved recipe; the odd ones below change one thing."""

    Config = OddConfig
    layout = BlockLayout(pre="embed", blocks="blocks", post="head")

    def __init__(self, cfg: OddConfig) -> None:
        self.cfg = cfg

    def build_model(self):
        return Stack(self.cfg.width)

    def train_dataset(self):
        g = torch.Generator().manual_seed(0)
        return TensorDataset(torch.randn(64, self.cfg.width, generator=g), torch.randn(64, 1, generator=g))

    def eval_dataset(self):
        return self.train_dataset()

    def loss(self, outputs, targets):
        return nn.functional.mse_loss(outputs, targets)


class RaisingInit(Regression):
    def __init__(self, cfg: OddConfig) -> None:
        raise RuntimeError("boom in __init__")


class BadLayout(Regression):
    layout = BlockLayout(pre="embed", blocks="layers", post="head")


class EmptyTrain(Regression):
    def train_dataset(self):
        return TensorDataset(torch.zeros(0, self.cfg.width), torch.zeros(0, 1))


class EmptyEval(Regression):
    def eval_dataset(self):
        return TensorDataset(torch.zeros(0, self.cfg.width), torch.zeros(0, 1))


class DictStream(IterableDataset):
    """A stream of dict samples, as Hugging Face `datasets` yield them (no length)."""

    def __init__(self, width: int, n: int) -> None:
        self.width, self.n = width, n

    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for _ in range(self.n):
            x = torch.randn(self.width, generator=g)
            yield {"features": x, "labels": x.sum(0, keepdim=True)}


class Streaming(Regression):
    def train_dataset(self):
        return DictStream(self.cfg.width, 64)

    def eval_dataset(self):
        return DictStream(self.cfg.width, 16)


class SmallEval(Regression):
    """An eval set smaller than one micro-batch: every pipeline schedule must still evaluate it."""

    def eval_dataset(self):
        g = torch.Generator().manual_seed(2)
        return TensorDataset(torch.randn(3, self.cfg.width, generator=g), torch.randn(3, 1, generator=g))
