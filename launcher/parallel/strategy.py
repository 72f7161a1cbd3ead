"""What a parallel strategy is: the interface the training loop calls, whatever the strategy.

Its own module so that the strategies (ddp.py, fsdp.py, pipeline.py) and the registry in
`launcher/parallel/__init__.py`, which imports them, do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from launcher.train.precision import MixedPrecision

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Strategy(Protocol):
    module: nn.Module
    """This rank's model (or model part), unwrapped: for the optimizer and state dicts."""
    dp_rank: int
    dp_size: int
    shard: str
    """Suffix of this rank's model/optimizer checkpoint files ('' when every rank holds the whole model)."""
    writes_shared_state: bool
    """Whether this rank writes its shard's model/optimizer files (one rank per shard does)."""
    model_parallel_size: int
    """Ranks one model replica is spread over (pp); each does 1/model_parallel_size of the FLOPs."""
    layout_id: str
    """The model's parallel layout as overrides (not the dp size); a checkpoint resumes only under it."""
    comm_hook: Any
    """The CommHook on the data-parallel group, or None (plain all-reduce, or no DP peers)."""
    comm_stats: Any
    """CommStats (bytes all-reduced per step; FSDPCommStats: also all-gathered and reduce-scattered),
    or None without data-parallel peers."""
    sharded_checkpoint: bool
    """Model and optimizer are saved with torch.distributed.checkpoint (every rank its shards) instead
    of one torch.save file per shard."""
    eval_in_lockstep: bool
    """Evaluation forwards are collectives (FSDP all-gathers): every rank must run as many of them."""
    times_exposed_comm: bool
    """Whether time_comm_s (gradient communication backward did not hide) can be measured."""
    param_device: torch.device
    """Where parameters and the optimizer step live: the rank's device, or the CPU under FSDP offload."""

    def forward_backward(self, micro_batches: list[Batch], amp: MixedPrecision) -> torch.Tensor:
        """Accumulate gradients over the micro-batches with the recipe's loss (the strategy took it from
        the recipe it was built from); return the step's mean loss (detached)."""

    def eval_forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Outputs for `inputs` on ranks that produce them, else None. Called under no_grad."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm (over all parameters of the whole model); clip if max_norm > 0."""

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Collective: the loss averaged over data-parallel ranks (valid on rank 0)."""
