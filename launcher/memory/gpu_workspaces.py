"""Convolution workspaces measured on this machine's GPU, for the estimator's trace.

A convolution takes a workspace from the caching allocator while it runs, sized by the algorithm
cuDNN picks for that shape, GPU and cuDNN version (one H100, cuDNN 9.19: 128.14 MiB for a 64-channel
3x3 forward over 64 MiB in and out, 130.11 MiB for its backward, bench/RESULTS.md). The odd tail is
what decides reserved memory: a 128.14 MiB request does not fit a freed 128 MiB block, so the GPU maps
another segment. No closed form knows the algorithm. Where the estimate runs beside the GPU it is
for (pre-flight, `micro_batch_size=auto`, `launcher.estimate` on a GPU node), each distinct call is run
once on that GPU, on uninitialised tensors of the traced shapes, strides and dtypes, and what the
allocator was asked for beyond the inputs and outputs is the workspace. Without a GPU, or in the
middle of a run (the estimate after an out-of-memory error: measuring resets the allocator's peak
statistics, which a run reports), the trace keeps the nominal size (`cuda_kernels.workspace_bytes`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map_only

aten = torch.ops.aten
MEASURED_OPS = (aten.convolution.default, aten.convolution_backward.default)


class GpuWorkspaces:
    """Workspace bytes per distinct call (op, shapes, strides, dtypes, other arguments), measured once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sizes: dict[Any, int] = {}

    def __call__(self, func: Any, args: tuple) -> int:
        key = (func, *(_describe(a) for a in args))
        if key not in self.sizes:
            self.sizes[key] = self._measure(func, args)
        return self.sizes[key]

    def _measure(self, func: Any, args: tuple) -> int:
        with _disable_current_modes(), torch.no_grad():  # real tensors: no fake mode, no tracker
            real = tree_map_only(
                torch.Tensor,
                lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=self.device),
                args,
            )
            torch.cuda.synchronize(self.device)
            before = _requested(self.device, "current")
            torch.cuda.reset_peak_memory_stats(self.device)
            out = func(*real)
            torch.cuda.synchronize(self.device)
            peak = _requested(self.device, "peak")
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            outputs = sum(t.untyped_storage().nbytes() for t in outs)
            del out, outs, real
        return max(0, peak - before - outputs)


_ACTIVE: list[GpuWorkspaces] = []


@contextmanager
def measured_here() -> Iterator[GpuWorkspaces | None]:
    """Inside: convolutions in a trace get their workspace measured on this process's GPU, if it has
    one; afterwards its cache is emptied and its peak statistics reset. For callers that run before
    the model is built (pre-flight, auto micro-batch, the estimate command), whose GPU holds nothing
    a run would report."""
    if not torch.cuda.is_available() or _ACTIVE:
        yield None
        return
    device = torch.device("cuda", torch.cuda.current_device())
    workspaces = GpuWorkspaces(device)
    _ACTIVE.append(workspaces)
    try:
        yield workspaces
    finally:
        _ACTIVE.remove(workspaces)
        if workspaces.sizes:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def measured_workspace(func: Any, args: tuple) -> int | None:
    """The workspace this call takes on the GPU, or None where nothing measures it."""
    if not _ACTIVE or func not in MEASURED_OPS:
        return None
    return _ACTIVE[-1](func, args)


def _describe(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (tuple(arg.shape), arg.stride(), arg.dtype)
    if isinstance(arg, (list, tuple)):
        return tuple(_describe(a) for a in arg)
    return arg


def _requested(device: torch.device, which: str) -> int:
    return torch.cuda.memory_stats(device).get(f"requested_bytes.all.{which}", 0)
