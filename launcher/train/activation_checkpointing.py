"""Activation checkpointing of a recipe's blocks: keep each block's input, recompute its inside."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn


def checkpoint_blocks(
    blocks: nn.ModuleList,
    context_fn: Callable[[], tuple[AbstractContextManager, AbstractContextManager]] = noop_context_fn,
) -> None:
    """Make every block recompute its activations during backward.

    The block's `forward` is replaced on the instance rather than wrapped in a new module, so
    parameter names and state dicts stay exactly as the recipe defined them. `context_fn` (torch's):
    context managers for the forward and the recomputation, which runs inside backward, where a
    caller's torch-function mode is not active (the memory trace needs its mode in both).
    """
    # torch.compile refuses any explicit context_fn, torch's own no-op included ("checkpoint not
    # implemented for ... context_fn"): pass one only when there is one.
    extra = {} if context_fn is noop_context_fn else {"context_fn": context_fn}
    for block in blocks:
        # use_reentrant=False: works with inputs that don't require grad, and with torch.compile.
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, **extra)
