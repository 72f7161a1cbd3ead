"""Cross-entropy over a large vocabulary without a whole fp32 copy of the logits.

`F.cross_entropy(logits.float(), targets)` on GPT-2-small logits (16 x 1024 x 50304, bf16 under
autocast) makes a 3.3 GB fp32 copy, keeps its 3.3 GB log-softmax for backward, and makes a 3.3 GB
fp32 gradient. Here the tokens are cut into chunks; each chunk is upcast, reduced to a loss sum and
dropped, and recomputed in backward (activation checkpointing per chunk), so at most one chunk is
ever in fp32. The sum over chunks divided by the token count is the same mean, to fp rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of (..., V) logits against (...) targets, `chunk_tokens` rows at a time."""
    flat, flat_targets = logits.flatten(0, -2), targets.flatten()
    if chunk_tokens <= 0 or flat.shape[0] <= chunk_tokens:
        return F.cross_entropy(flat.float(), flat_targets)
    # split (not slicing): its backward assembles one gradient tensor, instead of one full-size zero
    # tensor per chunk as slices would.
    total = sum(
        checkpoint(_chunk_loss_sum, part, part_targets, use_reentrant=False)
        for part, part_targets in zip(flat.split(chunk_tokens), flat_targets.split(chunk_tokens))
    )
    return total / flat.shape[0]
