"""The recipe's model and loss as one module, so that `torch.compile` and DDP see both.

Compiling the model alone leaves the loss eager: the logits' fp32 upcast, log-softmax and their
gradients each make a full-size fp32 tensor (GPT-2-small, micro-batch 16: 3.3 GB apiece). Compiled
together, Inductor fuses the upcast and the reduction into the kernels that read the logits, so those
tensors never exist (one H200: 1.25x the tokens/s of `model.compile()` at half its peak memory,
bench/RESULTS.md). Eager, it computes exactly `loss_fn(model(inputs), targets)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class WithLoss(nn.Module):
    """`forward(inputs, targets)` -> the recipe's loss. Parameters are the model's, under `model.`."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(inputs), targets)
