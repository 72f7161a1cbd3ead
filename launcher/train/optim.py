"""Optimizer and learning-rate schedule from `cfg.optim`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from launcher.config.schema import AdamWConfig, LRSchedule, OptimConfig, SGDConfig


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on matrices only (not biases, norms).

    Raises:
        TypeError: an optimizer config type this function does not know.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if isinstance(cfg, AdamWConfig):
        fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if isinstance(cfg, SGDConfig):
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise TypeError(f"no optimizer for config type {type(cfg).__name__}")


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warmup, then decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == LRSchedule.constant:
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(progress, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == LRSchedule.cosine else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
