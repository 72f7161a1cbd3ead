"""Averaging gradients over a data-parallel group after the backward passes, in buckets.

Used where DDP cannot be: pipeline stages, whose schedules run several forward/backward passes per
step in orders DDP's reducer does not expect. DDP communication hooks run here unchanged: each
bucket is handed to the hook through `Bucket`, which has the methods of torch's GradBucket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Hook = Callable[[Any, Any], torch.futures.Future]


class Bucket:
    """The GradBucket interface (buffer, gradients, parameters, index, is_last) over a flat tensor."""

    def __init__(self, index: int, count: int, params: list[nn.Parameter]) -> None:
        self._index, self._count, self._params = index, count, params
        self._buffer = torch.cat([p.grad.reshape(-1) for p in params])

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._index == self._count - 1

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def set_buffer(self, tensor: torch.Tensor) -> None:
        self._buffer = tensor

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def gradients(self) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self._params:
            views.append(self._buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views


class GradReducer:
    """Average `params`' gradients over `group`, optionally through a DDP comm hook."""

    def __init__(self, params: list[nn.Parameter], group: Any, bucket_cap_mb: float) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.hook: Hook | None = None
        self.hook_state: Any = None
        # Reverse order: the last layers' gradients are the first ready, as in DDP.
        self.buckets: list[list[nn.Parameter]] = []
        cap, size = bucket_cap_mb * 2**20, 0
        for p in reversed([p for p in params if p.requires_grad]):
            if (
                not self.buckets
                or size + p.numel() * p.element_size() > cap
                or p.dtype != self.buckets[-1][0].dtype
            ):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()

    def register_comm_hook(self, state: Any, hook: Hook) -> None:
        self.hook, self.hook_state = hook, state

    def reduce(self) -> None:
        """Collective over the group: every gradient becomes the group mean (or the hook's result)."""
        for bucket in self.buckets:
            for p in bucket:
                if p.grad is None:  # same bucket layout on every rank, even if a parameter got no grad
                    p.grad = torch.zeros_like(p)
        futures = []
        for i, params in enumerate(self.buckets):
            bucket = Bucket(i, len(self.buckets), params)
            futures.append((bucket, self._launch(bucket)))
        for bucket, future in futures:
            reduced = future.wait()
            reduced = reduced[0] if isinstance(reduced, list) else reduced
            offset = 0
            for p in bucket.parameters():
                p.grad.copy_(reduced[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _launch(self, bucket: Bucket) -> torch.futures.Future:
        if self.hook is not None:
            return self.hook(self.hook_state, bucket)
        buffer = bucket.buffer().div_(self.world)  # pre-divide, as DDP does
        return dist.all_reduce(buffer, group=self.group, async_op=True).get_future()
