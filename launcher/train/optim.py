"""Optimizer and learning-rate schedule from `cfg.optim`."""

from __future__ import annotations

import math
import types
from collections import defaultdict
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


def step_on_local_shards(optimizer: torch.optim.Optimizer) -> None:
    """Run `optimizer.step` on the local shards of DTensor parameters (FSDP2) instead of through DTensor.

    Why: DTensor dispatches each fused/foreach optimizer op in Python, unwrapping every tensor of every
    list on every call: host time the GPU waits through once the step is host-bound. The update is
    elementwise per shard, so the shards give the same numbers. Between steps the optimizer keeps its
    DTensor parameters and DTensor state (what DCP saves and reshards on load); during a step it sees
    the local tensors, rebuilt from those each time (a load may replace them). A no-op without DTensors.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]):
        return
    plain_step = optimizer.step

    def step(self: torch.optim.Optimizer, *args, **kwargs):  # noqa: ANN202 - the optimizer's own
        groups = [g["params"] for g in self.param_groups]
        state = self.state
        local_state: dict = defaultdict(dict)
        for group, params in zip(self.param_groups, groups):
            shards = []
            for p in params:
                shard = local_shard(p)
                shard.grad = local_shard(p.grad)
                if p in state:
                    local_state[shard] = {k: local_shard(v) for k, v in state[p].items()}
                shards.append(shard)
            group["params"] = shards
        self.state = local_state
        try:
            return plain_step(*args, **kwargs)
        finally:
            for group, params in zip(self.param_groups, groups):
                for p, shard in zip(params, group["params"]):
                    if shard is not p:
                        shard.grad = None
                    # State the step created or replaced (not updated in place): kept, as DTensors.
                    for key, value in local_state.get(shard, {}).items():
                        kept = state[p].get(key)
                        if local_shard(kept) is not value:
                            state[p][key] = _like(p, key, value)
                group["params"] = params
            self.state = state

    # A bound method, as LR schedulers expect to wrap (they read step.__func__).
    optimizer.step = types.MethodType(step, optimizer)


def local_shard(t: object) -> object:
    """A DTensor's local shard (the tensor itself, not a differentiable view); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _like(param: torch.Tensor, key: str, value: object) -> object:
    """A new per-element state tensor of a DTensor parameter's shard as a DTensor sharded like it (the
    view DCP saves); the step counter and anything not shaped like the shard stay as they are."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or key == "step":
        return value
    if value.shape != param._local_tensor.shape:
        return value
    return DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


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
