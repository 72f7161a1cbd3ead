"""Classifier for scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

A residual MLP: input projection, `n_blocks` residual blocks, classifier. Reports eval accuracy.

Run:  python -m launcher recipe=digits
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from launcher.recipe import BlockLayout, ConfigError

PIXELS, CLASSES = 64, 10


@dataclass
class DigitsModelConfig:
    hidden: int = 128
    """Width of the residual MLP."""
    n_blocks: int = 2
    """Residual blocks (the unit of activation checkpointing and pipeline splitting)."""
    dropout: float = 0.0
    """Dropout inside each block."""


@dataclass
class DigitsConfig:
    model: DigitsModelConfig = field(default_factory=DigitsModelConfig)
    val_fraction: float = 0.2
    """Fraction of the 1797 images held out for evaluation."""
    split_seed: int = 0
    """Seed of the fixed train/eval split (independent of train.seed)."""

    def __post_init__(self) -> None:
        if self.model.hidden < 1 or self.model.n_blocks < 1:
            raise ConfigError(
                "recipe.model",
                f"hidden={self.model.hidden}, n_blocks={self.model.n_blocks}",
                "both must be >= 1",
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("recipe.val_fraction", self.val_fraction, "must be in (0, 1)")


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class DigitsMLP(nn.Module):
    def __init__(self, cfg: DigitsModelConfig) -> None:
        super().__init__()
        self.stem = nn.Linear(PIXELS, cfg.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(cfg.hidden, cfg.dropout) for _ in range(cfg.n_blocks))
        self.classifier = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


class DigitsRecipe:
    Config = DigitsConfig
    layout = BlockLayout(pre="stem", blocks="blocks", post="classifier")

    def __init__(self, cfg: DigitsConfig) -> None:
        self.cfg = cfg
        self._splits: tuple[Dataset, Dataset] | None = None

    def build_model(self) -> nn.Module:
        return DigitsMLP(self.cfg.model)

    def _load(self) -> tuple[Dataset, Dataset]:
        if self._splits is None:
            from sklearn.datasets import load_digits

            images, labels = load_digits(return_X_y=True)
            order = np.random.default_rng(self.cfg.split_seed).permutation(len(labels))
            n_eval = int(len(labels) * self.cfg.val_fraction)
            x = torch.tensor(images[order] / 16.0, dtype=torch.float32)
            y = torch.tensor(labels[order], dtype=torch.int64)
            self._splits = TensorDataset(x[n_eval:], y[n_eval:]), TensorDataset(x[:n_eval], y[:n_eval])
        return self._splits

    def train_dataset(self) -> Dataset:
        return self._load()[0]

    def eval_dataset(self) -> Dataset | None:
        return self._load()[1]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets)

    def eval_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"eval_accuracy": (logits.argmax(dim=-1) == targets).float().mean()}
