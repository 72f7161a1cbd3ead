"""The tiny GPT recipe, except that a chosen training forward (or backward) raises CUDA's
out-of-memory error: how a real OOM reaches the launcher, without a GPU."""

from dataclasses import dataclass

import torch
from torch import nn

from recipes.gpt import GPTConfig, GPTRecipe


@dataclass
class OOMConfig(GPTConfig):
    oom_at_step: int = 3
    """The training step whose forward raises torch.cuda.OutOfMemoryError (0 = never)."""
    oom_in_backward: bool = False
    """Raise in that step's backward instead of its forward."""


class RaiseOOM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


class OOMAt(nn.Module):
    def __init__(self, model: nn.Module, cfg: OOMConfig) -> None:
        super().__init__()
        self.model, self.cfg, self.calls = model, cfg, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        hit = self.training and self.calls == self.cfg.oom_at_step
        if hit and not self.cfg.oom_in_backward:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        out = self.model(x)
        return RaiseOOM.apply(out) if hit else out


class OOMRecipe(GPTRecipe):
    Config = OOMConfig
    layout = None  # the wrapper hides the blocks; no checkpointing or pipelines here

    def build_model(self) -> nn.Module:
        return OOMAt(super().build_model(), self.cfg)
