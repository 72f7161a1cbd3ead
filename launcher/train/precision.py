"""Mixed precision: autocast for the forward pass, and loss scaling for fp16.

bf16 needs no loss scaling (same exponent range as fp32). fp16 does: GradScaler multiplies the loss
before backward and skips the optimizer step when any gradient overflowed, then lowers the scale.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from launcher.config.schema import Precision, PrecisionConfig

DTYPES = {
    Precision.fp32: None,
    Precision.bf16: torch.bfloat16,
    Precision.fp16: torch.float16,
    Precision.fp8: torch.bfloat16,  # around torchao's fp8 Linear layers (launcher/train/fp8.py)
}


class MixedPrecision:
    def __init__(self, cfg: PrecisionConfig, device: torch.device) -> None:
        self.dtype = DTYPES[cfg.dtype]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(
            device.type,
            init_scale=cfg.init_scale,
            growth_interval=cfg.growth_interval,
            enabled=cfg.dtype == Precision.fp16,
        )
        if self.scaling:
            # GradScaler creates its scale on the first scale() call; pipeline stages before the last
            # never scale a loss, yet unscale their gradients: create it now on every rank.
            self.scaler.scale(torch.zeros((), device=device))

    @property
    def scaling(self) -> bool:
        return self.scaler.is_enabled()

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide gradients by the loss scale in place, so clipping sees true norms."""
        if self.scaling:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> bool:
        """Optimizer step; with fp16, skipped (returns True) when the gradients overflowed.

        `grad_norm` is the norm over the whole model (all pipeline stages), so every rank decides the
        same: a stage whose own gradients are finite must still skip when another stage's are not.
        """
        if not self.scaling:
            optimizer.step()
            return False
        if not torch.isfinite(grad_norm).item():
            # What GradScaler does on overflow, decided globally: skip, back off, restart growth count.
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.scaler._growth_tracker.fill_(0)  # no public setter; update(new_scale) leaves it
            return True
        self.scaler.step(optimizer)
        self.scaler.update()
        return False

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's update; with fp16, close the scaler's step (unscale_ was already called)."""
        if self.scaling:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaling else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaling and state:
            self.scaler.load_state_dict(state)
