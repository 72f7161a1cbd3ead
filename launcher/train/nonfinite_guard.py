"""The non-finite check without a host synchronisation on ordinary steps (fused optimizers on CUDA).

Checking `isfinite(loss)` on the host every step (`.item()`) stalls the CPU until the GPU has finished
the backward pass, so the next step's kernels are queued late. Fused AdamW can skip its own update on
the device: it takes a `found_inf` tensor (the mechanism GradScaler uses) and leaves parameters,
moments and step counts untouched when it is non-zero. So on CUDA with a fused optimizer (and no fp16
loss scaling, whose GradScaler makes its own decision), the flag stays on the device: the update of a
non-finite step is never applied, and the host reads how many steps were dropped, and the first of them,
only on log steps, before a checkpoint, on a signal and at the end (`drain`). Elsewhere (CPU, SGD, fp16)
the loop checks on the host every step, as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteGuard:
    """Per-step non-finite flags, kept on the device where the optimizer can act on them."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, loss_scaling: bool) -> None:
        fused = bool(optimizer.defaults.get("fused")) and getattr(
            optimizer, "_step_supports_amp_scaling", False
        )
        self.on_device = device.type == "cuda" and fused and not loss_scaling
        self.optimizer = optimizer
        self._count = torch.zeros((), device=device)
        self._first = torch.zeros((), device=device)

    def flag(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> torch.Tensor:
        """1.0 where this step's loss or gradient norm is not finite on any rank, on the device.

        The gradient norm is global already (all-reduced gradients, all pipeline stages); the loss is
        per rank, hence the (tiny, asynchronous) device all-reduce.
        """
        bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm)).float()
        if dist.is_initialized() and self.on_device:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.on_device:
            self._first = torch.where((self._count == 0) & (bad > 0), float(step), self._first)
            self._count += bad
        return bad

    def step(self, bad: torch.Tensor) -> None:
        """optimizer.step(), skipped on the device when `bad` is non-zero."""
        self.optimizer.found_inf = bad
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def drain(self) -> tuple[int, int]:
        """(steps dropped since the last drain, the first of them) — one host synchronisation."""
        if not self.on_device:
            return 0, 0
        count, first = (int(v) for v in torch.stack([self._count, self._first]).tolist())
        self._count.zero_()
        self._first.zero_()
        return count, first
