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

    def outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's outputs alone (for evaluation)."""
        return self.model(inputs)


class BodyThenCompiledTail(nn.Module):
    """`loss(post(body(inputs)))`, with the model's `post` part and the loss compiled as one function.

    For strategies whose hooks run between units, where the whole model cannot be one graph (FSDP):
    the head's matmul and the loss still fuse, so the logits' fp32 upcast and log-softmax never exist
    (what `WithLoss` buys a compiled DDP run). `post.forward` becomes a pass-through, so the model's
    own forward (and the hooks around `post`) run as before and return `post`'s input; the layout's
    contract, `model(x) == post(blocks(...pre(x)))`, makes the two equal.
    """

    def __init__(
        self,
        model: nn.Module,
        post: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.model = model
        self.post_forward = post.forward
        self.loss_fn = loss_fn
        post.forward = _pass_through
        self.tail = torch.compile(self._tail)

    def _tail(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.post_forward(hidden), targets)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.tail(self.model(inputs), targets)

    def outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """What the unchanged model returns (for evaluation): `post` applied eagerly."""
        return self.post_forward(self.model(inputs))


def _pass_through(hidden: torch.Tensor) -> torch.Tensor:
    return hidden
