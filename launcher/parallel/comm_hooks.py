"""Gradient communication hooks: one table entry per `comm_hook=` option; PowerSGD state per rank.

DDP communication hooks, run on the data-parallel group: registered on DDP under parallel=ddp, on
GradReducer for pipeline stages. fp16/bf16 are ours (one fused scale-and-cast per bucket, see
`cast_compress_hook`); PowerSGD is ours (`launcher/parallel/powersgd.py`) or, with
`comm_hook.impl=torch`, torch's stock `powerSGD_hook`. torch's `batched_powerSGD_hook` is deliberately
not offered: it asserted in `_orthogonalize` on the GPT recipe (2x H200).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from launcher.config.schema import (
    BF16CommHookConfig,
    CompressDtype,
    FP16CommHookConfig,
    NoCommHookConfig,
    PowerSGDConfig,
    PowerSGDImpl,
)
from launcher.errors import ConfigError
from launcher.parallel.powersgd import BatchedPowerSGDState, powersgd_hook

log = logging.getLogger(__name__)

Hook = Callable[[Any, Any], torch.futures.Future]
# The PowerSGDState fields that change during training; everything else comes from the config.
POWERSGD_FIELDS = (
    "iter",
    "error_dict",
    "p_memory_dict",
    "q_memory_dict",
    "total_numel_before_compression",
    "total_numel_after_compression",
    "next_stats_report",
)


@dataclass
class CommHook:
    hook: Hook
    state: Any
    """What the hook receives: the process group (fp16/bf16) or a PowerSGDState."""
    element_bytes: int
    """Bytes per element sent (2 for fp16/bf16 payloads, 4 for fp32)."""
    powersgd: PowerSGDState | BatchedPowerSGDState | None = None


def check_comm_hook(cfg: Any) -> None:
    """Raises ConfigError for invalid hook settings (before any process group exists)."""
    if not isinstance(cfg, PowerSGDConfig):
        return
    if cfg.rank < 1:
        raise ConfigError("comm_hook.rank", cfg.rank, "must be >= 1", "e.g. comm_hook.rank=4")
    if cfg.start_iter <= 1 and (cfg.error_feedback or cfg.warm_start):
        raise ConfigError(
            "comm_hook.start_iter",
            cfg.start_iter,
            "must be > 1 with error_feedback or warm_start: DDP settles its gradient buckets in the "
            "first steps, and per-bucket PowerSGD state must not start before",
            "use comm_hook.start_iter=10, or error_feedback=false warm_start=false",
        )
    if cfg.min_compression_rate <= 0:
        raise ConfigError("comm_hook.min_compression_rate", cfg.min_compression_rate, "must be > 0")
    if cfg.orthogonalization_epsilon < 0:
        raise ConfigError(
            "comm_hook.orthogonalization_epsilon", cfg.orthogonalization_epsilon, "must be >= 0"
        )


def build_comm_hook(cfg: Any, group: Any, guard_overflow: bool) -> CommHook | None:
    """The hook for `cfg` on `group` (None = the default group), or None for plain all-reduce.

    Args:
        guard_overflow: fp16 loss scaling is on: a step with inf/NaN gradients (which the scaler will
            skip) must not reach PowerSGD, or its error-feedback buffers would stay inf forever.
    """
    if isinstance(cfg, NoCommHookConfig):
        return None
    if isinstance(cfg, FP16CommHookConfig):
        return CommHook(cast_compress_hook, CastState(group, torch.float16), 2)
    if isinstance(cfg, BF16CommHookConfig):
        return CommHook(cast_compress_hook, CastState(group, torch.bfloat16), 2)
    if isinstance(cfg, PowerSGDConfig):
        common = dict(
            process_group=group,
            matrix_approximation_rank=cfg.rank,
            start_powerSGD_iter=cfg.start_iter,
            min_compression_rate=cfg.min_compression_rate,
            use_error_feedback=cfg.error_feedback,
            warm_start=cfg.warm_start,
            orthogonalization_epsilon=cfg.orthogonalization_epsilon,
            random_seed=cfg.seed,
        )
        if cfg.impl == PowerSGDImpl.torch:
            state = PowerSGDState(**common, batch_tensors_with_same_shape=cfg.batch_same_shape)
            hook: Hook = powerSGD_hook
        else:
            if cfg.batch_same_shape:
                log.warning("comm_hook.batch_same_shape has no effect with impl=ours: it always batches")
            state, hook = (
                BatchedPowerSGDState(
                    **common, cuda_graphs=cfg.cuda_graphs, triton_kernels=cfg.triton_kernels
                ),
                powersgd_hook,
            )
        if cfg.compress_dtype == CompressDtype.fp16:
            hook = default_hooks.fp16_compress_wrapper(hook)
        elif cfg.compress_dtype == CompressDtype.bf16:
            hook = _renamed(default_hooks.bf16_compress_wrapper(hook))
        if guard_overflow:
            hook = _plain_allreduce_on_overflow(hook, group)
        return CommHook(hook, state, 4 if cfg.compress_dtype == CompressDtype.none else 2, powersgd=state)
    raise TypeError(f"no comm hook for config type {type(cfg).__name__}")


class CastState:
    """fp16/bf16 hook state: the group, the wire dtype, one reusable wire buffer per bucket, and on
    CUDA a stream of its own for the casts."""

    def __init__(self, group: Any, dtype: torch.dtype) -> None:
        self.group, self.dtype = group, dtype
        self.wire: dict[int, torch.Tensor] = {}
        self.streams: dict[torch.device, torch.cuda.Stream] = {}


def cast_compress_hook(state, bucket):  # unannotated: DDP checks annotations and would reject strings
    """All-reduce the bucket in fp16/bf16 and hand DDP the half-precision mean.

    One fused divide-and-cast into a reused buffer, on a side stream on CUDA so that backward goes on
    meanwhile; no cast back: DDP (and GradReducer) copy the result into `.grad` anyway, and that copy
    converts. On one H100 (GPT-2-small, one-rank NCCL) this took the hook from +6.5% of a step to
    +3.3% (DDP alone: +2.2%); torch's C++ fp16 hook, which casts back, costs +6.9% (bench/RESULTS.md).
    torch's hooks are also refused by name for bf16 without NCCL >= 2.10 (gloo all-reduces bf16
    correctly; checked).
    """
    group = state.group if state.group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    wire = state.wire.get(bucket.index())
    if wire is None or wire.shape != buffer.shape or wire.device != buffer.device:
        wire = state.wire[bucket.index()] = torch.empty_like(buffer, dtype=state.dtype)
    side = None
    if buffer.is_cuda:
        side = state.streams.get(buffer.device)
        if side is None:
            side = state.streams[buffer.device] = torch.cuda.Stream(buffer.device)
        # The side stream waits for the gradients (and for the last step's copy out of `wire`).
        side.wait_stream(torch.cuda.current_stream(buffer.device))
    with torch.cuda.stream(side):  # None (CPU): no stream switch
        torch.div(buffer, dist.get_world_size(group), out=wire)  # pre-divide as DDP does, cast in one pass
        return dist.all_reduce(wire, group=group, async_op=True).get_future().then(_value)


def _value(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()[0]


def _renamed(hook: Hook) -> Hook:
    """The same hook under another name. DDP refuses the stock bf16 hooks *by name* unless CUDA and
    NCCL >= 2.10 are present (older NCCL lacked bf16); gloo all-reduces bf16 correctly (checked), so
    on CPU the name check would only stand in the way."""

    def bf16_hook(state, bucket):  # unannotated: DDP checks annotations and would reject strings
        return hook(state, bucket)

    return bf16_hook


def _plain_allreduce_on_overflow(hook: Hook, group: Any) -> Hook:
    """Buckets with inf/NaN on any rank bypass the hook: plain all-reduce, hook state untouched.

    The inf reaches the optimizer, the GradScaler skips the step, and PowerSGD's state (and its
    iteration count) is as if the step never happened. Costs one tiny all-reduce per bucket.
    """

    def guarded(state, bucket):  # unannotated: DDP checks annotations and would reject strings
        finite = torch.isfinite(bucket.buffer()).all().to(torch.float32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)  # every rank must take the same branch
        if finite.item():
            return hook(state, bucket)
        buffer = bucket.buffer().div_(dist.get_world_size(group))
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda f: f.value()[0])

    return guarded


def hook_state_dict(comm: CommHook | None) -> dict[str, Any]:
    """This rank's hook state as tensors and plain values (loads with weights_only=True)."""
    if comm is None or comm.powersgd is None:
        return {}
    state = comm.powersgd
    name, keys, pos, has_gauss, cached = state.rng.get_state()
    saved: dict[str, Any] = {field: getattr(state, field) for field in POWERSGD_FIELDS}
    saved["rng"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    return saved


def load_hook_state(comm: CommHook | None, saved: dict[str, Any], device: torch.device) -> None:
    """Restore what hook_state_dict saved. The process group is not in it: the state keeps the one it
    was built with (the data-parallel group of this rank), never torch's default of WORLD."""
    if comm is None or comm.powersgd is None or not saved:
        return
    state = comm.powersgd
    for field in POWERSGD_FIELDS:
        value = saved[field]
        if isinstance(value, dict):
            value = {k: v.to(device) for k, v in value.items()}
        setattr(state, field, value)
    name, keys, pos, has_gauss, cached = saved["rng"]
    state.rng.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class CommStats:
    """Bytes this rank hands to all-reduce per step, with and without the hook."""

    def __init__(self, comm: CommHook | None, params: list[torch.nn.Parameter]) -> None:
        self.comm = comm
        self.numel = sum(p.numel() for p in params if p.requires_grad)
        self.plain_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        self._after = comm.powersgd.total_numel_after_compression if comm and comm.powersgd else 0

    def step(self, steps: int = 1) -> dict[str, float]:
        """Per-step numbers, averaged over the `steps` optimizer steps since the previous call."""
        if self.comm is None:
            sent = self.plain_bytes
        elif self.comm.powersgd is None:
            sent = self.numel * self.comm.element_bytes
        else:
            after = self.comm.powersgd.total_numel_after_compression
            # PowerSGD counts what it sends once it compresses (cumulatively); before start_iter it sends
            # everything uncompressed and counts nothing.
            elements = (after - self._after) / steps if after > self._after else self.numel
            self._after = after
            sent = elements * self.comm.element_bytes
        return {
            "allreduce_bytes": sent,
            "allreduce_bytes_uncompressed": self.plain_bytes,
            "compression_ratio": self.plain_bytes / sent,
        }
