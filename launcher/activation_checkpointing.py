"""Activation checkpointing of a recipe's blocks: keep each block's input, recompute its inside."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Make every block recompute its activations during backward.

    The block's `forward` is replaced on the instance rather than wrapped in a new module, so
    parameter names and state dicts stay exactly as the recipe defined them.
    """
    for block in blocks:
        # use_reentrant=False: works with inputs that don't require grad, and with torch.compile.
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
