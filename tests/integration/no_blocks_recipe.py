"""A recipe without a BlockLayout: fine for DDP, refused for pipelines and activation checkpointing."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset


@dataclass
class NoBlocksConfig:
    width: int = 4


class NoBlocks:
    Config = NoBlocksConfig

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self):
        return nn.Linear(self.cfg.width, 1)

    def train_dataset(self):
        return TensorDataset(torch.randn(64, self.cfg.width), torch.randn(64, 1))

    def eval_dataset(self):
        return None

    def loss(self, outputs, targets):
        return nn.functional.mse_loss(outputs, targets)
