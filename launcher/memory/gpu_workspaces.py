"""cuDNN workspaces (convolutions, LSTMs) measured on this machine's GPU, for the estimator's trace.

A convolution takes a workspace from the caching allocator while it runs, sized by the algorithm
cuDNN picks for that shape, GPU and cuDNN version (one H100, cuDNN 9.19: 128.14 MiB for a 64-channel
3x3 forward over 64 MiB in and out, 130.11 MiB for its backward, bench/RESULTS.md). The odd tail is
what decides reserved memory: a 128.14 MiB request does not fit a freed 128 MiB block, so the GPU maps
another segment. No closed form knows the algorithm. Where the estimate runs beside the GPU it is
for (pre-flight, `micro_batch_size=auto`, `launcher.estimate` on a GPU node), each distinct call is run
once on that GPU, on uninitialised tensors of the traced shapes, strides and dtypes, and what the
allocator was asked for beyond the inputs and outputs is the workspace. cuDNN's LSTM likewise, forward
and backward (`aten._cudnn_rnn` and its backward, whose outputs include the reserve it keeps). Without
a GPU, where a measurement fails, or in the middle of a run (the estimate after an out-of-memory error:
measuring resets the allocator's peak statistics, which a run reports), the trace keeps the nominal
sizes (`cuda_kernels`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map_only

log = logging.getLogger(__name__)
aten = torch.ops.aten
MEASURED_OPS = (aten.convolution.default, aten.convolution_backward.default)
CUDNN_LSTM = 2  # cuDNN's RNN mode enum: RELU, TANH, LSTM, GRU


class LstmShape(NamedTuple):
    """What cuDNN's LSTM workspace depends on."""

    input_size: int
    hidden: int
    layers: int
    directions: int
    batch: int
    steps: int
    batch_first: bool
    has_biases: bool
    dtype: torch.dtype


class GpuWorkspaces:
    """Workspace bytes per distinct call (op, shapes, strides, dtypes, other arguments), measured once."""

    def __init__(self, device: torch.device | int | None = None) -> None:
        self._device = device
        self.sizes: dict[Any, Any] = {}

    @property
    def device(self) -> torch.device:
        """The GPU measured on (asking starts CUDA there)."""
        if not isinstance(self._device, torch.device):
            index = torch.cuda.current_device() if self._device is None else self._device
            self._device = torch.device("cuda", index)
        return self._device

    def __call__(self, func: Any, args: tuple) -> int | None:
        key = (func, *(_describe(a) for a in args))
        if key not in self.sizes:
            self.sizes[key] = self._safely(self._measure, func, args)
        return self.sizes[key]

    def lstm(self, shape: LstmShape) -> tuple[int, int] | None:
        """(forward, backward) workspace bytes of cuDNN's LSTM at this shape."""
        if shape not in self.sizes:
            self.sizes[shape] = self._safely(self._measure_lstm, shape)
        return self.sizes[shape]

    def _safely(self, measure: Any, *args: Any) -> Any:
        try:
            return measure(*args)
        except Exception as err:  # noqa: BLE001 - the nominal size is a fine answer
            log.debug("workspace not measured (%s: %s): the nominal size instead", type(err).__name__, err)
            return None

    def _measure(self, func: Any, args: tuple) -> int:
        with _disable_current_modes(), torch.no_grad():  # real tensors: no fake mode, no tracker
            real = tree_map_only(
                torch.Tensor,
                lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=self.device),
                args,
            )
            return self._beyond_outputs(lambda: func(*real))[0]

    def _measure_lstm(self, shape: LstmShape) -> tuple[int, int]:
        def zeros(*size: int) -> torch.Tensor:
            return torch.zeros(size, dtype=shape.dtype, device=self.device)

        batch_first, layers, hidden = shape.batch_first, shape.layers, shape.hidden
        with _disable_current_modes(), torch.no_grad():
            x = zeros(
                *((shape.batch, shape.steps) if batch_first else (shape.steps, shape.batch)), shape.input_size
            )
            weights = []
            for layer in range(layers):
                width = shape.input_size if layer == 0 else hidden * shape.directions
                for _ in range(shape.directions):
                    weights += [zeros(4 * hidden, width), zeros(4 * hidden, hidden)]
                    weights += [zeros(4 * hidden), zeros(4 * hidden)] if shape.has_biases else []
            h0 = zeros(layers * shape.directions, shape.batch, hidden)
            fixed = (CUDNN_LSTM, hidden, 0, layers, batch_first, 0.0, True, shape.directions == 2, [], None)
            stride0 = 4 if shape.has_biases else 2

            def forward() -> tuple:
                return aten._cudnn_rnn(x, weights, stride0, None, h0, h0, *fixed)

            forward_bytes, outs = self._beyond_outputs(forward)
            out, hy, cy, reserve, weight_buf = outs

            grads = (torch.zeros_like(out), torch.zeros_like(hy), torch.zeros_like(cy))

            def backward() -> tuple:
                return aten._cudnn_rnn_backward(
                    x, weights, stride0, weight_buf, h0, h0, out, *grads, *fixed, reserve, [True] * 4
                )

            backward_bytes, _ = self._beyond_outputs(backward)
        return forward_bytes, backward_bytes

    def _beyond_outputs(self, run: Any) -> tuple[int, Any]:
        """Peak bytes asked of the allocator while `run()` runs, beyond the outputs it returns."""
        torch.cuda.synchronize(self.device)
        before = _requested(self.device, "current")
        torch.cuda.reset_peak_memory_stats(self.device)
        out = run()
        torch.cuda.synchronize(self.device)
        peak = _requested(self.device, "peak")
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in tree_leaves(out)
            if isinstance(t, torch.Tensor)
        }
        return max(0, peak - before - sum(storages.values())), out


_ACTIVE: list[GpuWorkspaces] = []


@contextmanager
def measured_here(device: torch.device | int | None = None) -> Iterator[GpuWorkspaces | None]:
    """Inside: convolutions and LSTMs in a trace get their workspaces measured on `device` (default:
    the current one), if this machine has a GPU; CUDA starts only at the first measurement. Afterwards
    the GPU's cache is emptied and its peak statistics reset: for callers that run before the model is
    built (pre-flight, auto micro-batch, the estimate command), whose GPU holds nothing a run reports."""
    if not torch.cuda.is_available() or _ACTIVE:
        yield None
        return
    workspaces = GpuWorkspaces(device)
    _ACTIVE.append(workspaces)
    try:
        yield workspaces
    finally:
        _ACTIVE.remove(workspaces)
        if workspaces.sizes:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(workspaces.device)


def measured_workspace(func: Any, args: tuple) -> int | None:
    """The workspace this call takes on the GPU, or None where nothing measures it."""
    if not _ACTIVE or func not in MEASURED_OPS:
        return None
    return _ACTIVE[-1](func, args)


def measured_lstm_workspaces(shape: LstmShape) -> tuple[int, int] | None:
    """cuDNN LSTM's (forward, backward) workspaces on the GPU, or None where nothing measures them."""
    return _ACTIVE[-1].lstm(shape) if _ACTIVE else None


def _describe(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (tuple(arg.shape), arg.stride(), arg.dtype)
    if isinstance(arg, (list, tuple)):
        return tuple(_describe(a) for a in arg)
    return arg


def _requested(device: torch.device, which: str) -> int:
    return torch.cuda.memory_stats(device).get(f"requested_bytes.all.{which}", 0)
