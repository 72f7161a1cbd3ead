"""Pipeline evaluation as a plain chain of stage forwards, outside torch's schedules.

torch's schedules are built for training: `schedule.eval` crashes under ZBVZeroBubble ("can't
steal_bwd_input if this stage doesn't have backward") and needs every batch split into the same
number of equal microbatches. Evaluation needs neither: stage 0 runs the batch, sends the activation
to the rank holding stage 1, and so on; the last stage returns the outputs. Any batch size works (a
short final batch, an eval set smaller than a micro-batch), and every schedule evaluates the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

# Activation dtypes a stage may send (autocast gives bf16/fp16); the header carries the index.
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
HEADER = 8  # ndim, dtype index, up to 6 sizes


class EvalChain:
    """Runs the stages this rank holds in stage order, passing activations along the pp group."""

    def __init__(
        self,
        stages: dict[int, nn.Module],
        owners: Sequence[int],
        group: dist.ProcessGroup,
        device: torch.device,
    ) -> None:
        """`stages`: stage index -> module on this rank; `owners[s]`: the pp rank holding stage s."""
        self.stages, self.owners, self.group, self.device = stages, list(owners), group, device
        self.me = dist.get_rank(group)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The last stage's outputs on the rank holding it; None elsewhere."""
        x: torch.Tensor | None = None
        last = len(self.owners) - 1
        for s, owner in enumerate(self.owners):
            if owner != self.me:
                continue
            if s == 0:
                x = inputs
            elif self.owners[s - 1] != self.me:
                x = self._recv(self.owners[s - 1])
            x = self.stages[s](x)
            if s < last and self.owners[s + 1] != self.me:
                self._send(x, self.owners[s + 1])
        return x if self.owners[last] == self.me else None

    def _send(self, x: torch.Tensor, dst: int) -> None:
        if x.dim() > HEADER - 2:
            raise ValueError(f"pipeline activations of {x.dim()} dimensions are not supported")
        header = torch.zeros(HEADER, dtype=torch.int64, device=self.device)
        header[0], header[1] = x.dim(), DTYPES.index(x.dtype)
        header[2 : 2 + x.dim()] = torch.tensor(x.shape, dtype=torch.int64)
        peer = dist.get_global_rank(self.group, dst)
        dist.send(header, peer, group=self.group)
        dist.send(x.contiguous(), peer, group=self.group)

    def _recv(self, src: int) -> torch.Tensor:
        peer = dist.get_global_rank(self.group, src)
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, peer, group=self.group)
        ndim, dtype, *sizes = header.tolist()
        x = torch.empty(sizes[:ndim], dtype=DTYPES[dtype], device=self.device)
        dist.recv(x, peer, group=self.group)
        return x
