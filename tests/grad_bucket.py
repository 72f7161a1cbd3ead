"""What a comm hook reads of DDP's GradBucket, for driving PowerSGD's hook without DDP."""

from __future__ import annotations

import torch


class Bucket:
    """Bucket 0, the last, holding `buffer` for parameters of `shapes` (meta tensors: shapes only)."""

    def __init__(self, buffer: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        self._buffer, self._params = buffer, [torch.empty(s, device="meta") for s in shapes]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return True
