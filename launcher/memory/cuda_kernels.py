"""What CUDA runs where a CPU trace would run something else, for the memory trace.

The estimator traces on the CPU under fake tensors, so torch picks CPU kernels. For most ops the
CPU and CUDA kernels return the same tensors, but not for these, which decide the peak:

- **Attention** (`F.scaled_dot_product_attention`): with dropout or a mask the CPU takes the math
  path, which materialises the (batch, heads, seq, seq) scores, probabilities and dropout mask in
  fp32 (a 12 GiB over-estimate at seq 2048). CUDA runs a fused kernel that keeps only the output and
  its log-sum-exp. `CudaKernels` routes the call to the kernel CUDA picks (`attention_backend`).
- **cuDNN RNNs** (LSTM, GRU, tanh/ReLU RNN): the CPU loops over time steps; cuDNN keeps a reserve
  buffer for backward and takes a large workspace while it runs. Routed to `_CudnnRNN`, which
  allocates what cuDNN allocates.
- **Dropout**: the CPU multiplies by a saved noise tensor of the input's dtype; CUDA's fused kernel
  saves a one-byte mask.
- **Workspaces** that kernels take from the caching allocator while they run (cuDNN convolution and
  attention backward): `workspace_bytes` gives them for the trace to count at that moment.

Every number here was read on one H100 (torch 2.11, cuDNN 9.19) with `bench/probe_memory.py`, which
records each CUDA op's outputs and the allocator's peak during it; the docstrings quote it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten
LOW_PRECISION = (torch.float16, torch.bfloat16)
RNN_RESERVE_PER_ELEMENT = {"lstm": 5, "gru": 6, "rnn_tanh": 1, "rnn_relu": 1}
"""cuDNN's reserve space (kept for backward), in elements of the compute dtype per (batch, step, hidden
unit) of every layer and direction: an LSTM's 4 gates and cell, a GRU's 6 gate values, a plain RNN's
one pre-activation. An LSTM with `proj_size` p keeps h + p more per (batch, step); with several layers
the outputs of all but the top layer are kept too; 256 bytes on top. Probe (H100, cuDNN 9.19,
`bench/probe_memory.py rnn`): at batch 32 x 256 steps x 1024 units, fp16, one layer: LSTM 83,886,336
bytes, GRU 100,663,552, tanh RNN 16,777,472; two-layer LSTM 184,549,632; LSTM with proj 512
109,052,160; halving the batch or the width halves each (less 256)."""
RESERVE_PAD_BYTES = 256
RNN_WORKSPACE_BYTES = {
    ("lstm", False): (30, 0),
    ("lstm", True): (48, 0),
    ("lstm_layers", False): (24.3, 320),
    ("lstm_layers", True): (11.6, 192),
    ("lstm_bidir", False): (30.3, 320),
    ("lstm_bidir", True): (15.2, 168),
    ("lstm_proj", False): (26.1, 136),
    ("lstm_proj", True): (12.5, 84),
    ("gru", False): (24.1, 128),
    ("gru", True): (12.0, 80),
    ("rnn", False): (23.0, 64),
    ("rnn", True): (30.0, 48),
}
"""cuDNN's workspace while an RNN call runs (forward, and again in each of backward's two kernels),
by kind and half precision: (bytes per batch x step x hidden unit x direction, bytes per step x hidden
unit). The second part does not grow with the batch. Probe (H100, cuDNN 9.19, `bench/probe_memory.py
rnn`, 256 steps; batch 32 and 16 at width 1024, batch 32 at 512), reading each forward's transient plus
the weight buffer it returns (an input, not new) less its copy of the input: e.g. a two-layer fp32
LSTM 274.5 MiB at batch 32 and 177.25 at 16 (the latter also in a training run's allocator history).
A one-layer LSTM (30 / 48 bytes) was calibrated at batch 32-64 only."""


def _rnn_workspace_kind(geometry: tuple) -> str:
    mode, layers, directions, hidden, out_size, _ = geometry
    if mode == "gru":
        return "gru"
    if mode != "lstm":
        return "rnn"
    if directions > 1:
        return "lstm_bidir"
    if layers > 1:
        return "lstm_layers"
    return "lstm_proj" if out_size != hidden else "lstm"


def attention_backend(
    dtype: torch.dtype, head_dim: int, has_mask: bool, dropout_p: float, enable_gqa: bool = False
) -> str:
    """The fused attention kernel torch 2.11 picks on a Hopper GPU, by what the probe saw.

    fp16/bf16 with head_dim <= 128 (multiple of 8): cuDNN, with or without dropout, causal or a mask.
    fp32 (or a shape cuDNN refuses): memory-efficient attention, which also takes masks and dropout.
    Flash attention (fp16/bf16, no mask) would need the same memory as cuDNN's.
    """
    if dtype in LOW_PRECISION and head_dim <= 128 and head_dim % 8 == 0 and not enable_gqa:
        return "cudnn"
    if dtype in LOW_PRECISION and not has_mask and head_dim <= 256:
        return "flash"
    return "efficient"


class CudaKernels(TorchFunctionMode):
    """Inside a fake-tensor trace: attention and RNNs run as the kernels CUDA would choose."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        if func is F.dropout:
            return _dropout(*args, **kwargs)
        mode = RNN_MODES.get(func)
        if mode is not None and len(args) == 9 and isinstance(args[2], (tuple, list)):  # not packed
            return _rnn(mode, *args)
        return func(*args, **kwargs)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype CUDA autocast runs attention and RNNs in (the trace's autocast is the CPU one)."""
    if torch.is_autocast_enabled("cpu") and t.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return t.dtype


def _attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    dtype = _compute_dtype(query)
    with torch.autocast("cpu", enabled=False):
        q, k, v = (t.to(dtype) for t in (query, key, value))
        backend = attention_backend(dtype, q.shape[-1], attn_mask is not None, dropout_p, enable_gqa)
        bias = None
        if attn_mask is not None:
            # A boolean mask becomes an additive bias of the mask's own (broadcast) shape.
            bias = (
                torch.where(attn_mask, 0.0, float("-inf")).to(dtype)
                if attn_mask.dtype == torch.bool
                else attn_mask.to(dtype)
            )
            bias = bias.expand(*q.shape[:-2], q.shape[-2], k.shape[-2])
        if backend == "cudnn":
            return aten._scaled_dot_product_cudnn_attention(
                q, k, v, bias, True, dropout_p, is_causal and bias is None, False, scale=scale
            )[0]
        if backend == "flash":
            return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
        return aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p, is_causal and bias is None, scale=scale
        )[0]


def _dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    """CUDA's fused dropout: the output and a bool mask (kept for backward)."""
    if not training or p == 0.0 or not input.is_floating_point():
        return input
    return aten.native_dropout(input, p, True)[0]


def workspace_bytes(func, args, out) -> int:  # noqa: ANN001
    """Bytes a CUDA kernel takes from the caching allocator while it runs, beyond its outputs.

    Probe (H100): a convolution's forward and backward take about its input plus its output (e.g. 128
    MiB for 64 MiB in and out; cuDNN's chosen algorithm, not cudnn.benchmark); cuDNN attention's
    backward three query-sized buffers plus an fp32 (batch, heads, seq); memory-efficient attention's
    backward two (flash attention's fp32 dq accumulator is the same size).
    """
    if func is aten.convolution.default:
        return _nbytes(args[0]) + _nbytes(out)
    if func is aten.convolution_backward.default:
        return _nbytes(args[0]) + _nbytes(args[1])
    if func is aten._scaled_dot_product_cudnn_attention_backward.default:
        q = args[1]
        return 3 * _nbytes(q) + q[..., 0].numel() * 4
    if func in (
        aten._scaled_dot_product_efficient_attention_backward.default,
        aten._scaled_dot_product_flash_attention_backward.default,
    ):
        q = args[1]
        return 2 * q.numel() * max(q.element_size(), 2) + 2 * q[..., 0].numel() * 4
    return 0


def _nbytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# --- cuDNN RNNs ----------------------------------------------------------------------------------

RNN_MODES = {
    torch._VF.lstm: "lstm",
    torch._VF.gru: "gru",
    torch._VF.rnn_tanh: "rnn_tanh",
    torch._VF.rnn_relu: "rnn_relu",
}


def _rnn(mode, input, hx, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first):  # noqa: ANN001
    """`torch._VF.<mode>` as cuDNN runs it (same outputs; what it keeps and takes while it runs)."""
    h0, c0 = hx if mode == "lstm" else (hx, None)
    hidden = (c0 if c0 is not None else h0).shape[-1]
    geometry = (mode, num_layers, 2 if bidirectional else 1, hidden, h0.shape[-1], batch_first)
    out, h, c = _CudnnRNN.apply(geometry, _compute_dtype(input), input, h0, c0, *weights)
    return (out, h, c) if mode == "lstm" else (out, h)


def _rnn_reserve_bytes(geometry: tuple, batch: int, steps: int, itemsize: int) -> int:
    mode, layers, directions, hidden, out_size, _ = geometry
    per_layer = RNN_RESERVE_PER_ELEMENT[mode] * hidden + (hidden + out_size if out_size != hidden else 0)
    per_step = layers * directions * per_layer + (layers - 1) * directions * out_size
    return batch * steps * per_step * itemsize + RESERVE_PAD_BYTES


def _rnn_workspace_bytes(geometry: tuple, batch: int, steps: int, dtype: torch.dtype) -> int:
    """RNN_WORKSPACE_BYTES of the algorithm cuDNN picks for this kind of RNN and dtype."""
    _, _, directions, hidden, _, _ = geometry
    per_unit, per_step_unit = RNN_WORKSPACE_BYTES[(_rnn_workspace_kind(geometry), dtype in LOW_PRECISION)]
    return int(per_unit * batch * steps * hidden * directions + per_step_unit * steps * hidden)


def _batch_first_copy(tensor: torch.Tensor | None, batch_first: bool) -> torch.Tensor | None:
    """aten's cuDNN RNN kernels take (steps, batch, features) contiguous: a batch-first input, output
    gradient (backward) is copied for the duration of the call (aten's transpose + contiguous)."""
    return torch.empty_like(tensor) if batch_first and tensor is not None else None


class _CudnnRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, geometry, dtype, input, h0, c0, *weights):  # noqa: ANN001
        mode, layers, directions, hidden, out_size, batch_first = geometry
        batch, steps = (input.shape[0], input.shape[1]) if batch_first else (input.shape[1], input.shape[0])
        x = input.to(dtype)
        # Under autocast cuDNN runs on one flat low-precision copy of the weights (kept for backward).
        flat = (
            torch.empty(sum(w.numel() for w in weights), dtype=dtype) if dtype != weights[0].dtype else None
        )
        # In aten's _cudnn_rnn order: the (steps, batch) copy of a batch-first input, the outputs, the
        # workspace, the reserve; the copy and the workspace are freed when the kernel returns, so all
        # of them are alive together while it runs.
        out_shape = (
            (batch, steps, out_size * directions) if batch_first else (steps, batch, out_size * directions)
        )
        x_copy = _batch_first_copy(x, batch_first)
        out = torch.empty(out_shape, dtype=dtype)
        h = torch.empty((layers * directions, batch, out_size), dtype=dtype)
        c = torch.empty((layers * directions, batch, hidden), dtype=dtype) if c0 is not None else None
        ctx.workspace_bytes = _rnn_workspace_bytes(geometry, batch, steps, dtype)  # backward takes it twice
        workspace = torch.empty(ctx.workspace_bytes, dtype=torch.uint8)
        reserve = torch.empty(_rnn_reserve_bytes(geometry, batch, steps, x.element_size()), dtype=torch.uint8)
        del workspace, x_copy
        ctx.batch_first = batch_first
        ctx.has_c = c0 is not None
        saved_c0 = [c0] if c0 is not None else []
        ctx.save_for_backward(x, h0, *saved_c0, out, reserve, *([flat] if flat is not None else []))
        ctx.shapes, ctx.input_dtype = [(w.shape, w.dtype) for w in weights], input.dtype
        return out, h, c

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_c):  # noqa: ANN001
        saved = ctx.saved_tensors  # reserve and output stay alive while backward runs
        x, h0 = saved[:2]
        c0 = saved[2] if ctx.has_c else None
        # aten's order: (batch-first) copies of the input and output gradient, the input gradients, a
        # workspace while that kernel runs; then a copy of the input, the weights' gradients (one flat
        # buffer) and a workspace again while theirs runs.
        copies = [_batch_first_copy(x, ctx.batch_first), _batch_first_copy(grad_out, ctx.batch_first)]
        grad_x, grad_h = torch.empty_like(x), torch.empty_like(h0)
        grad_c = torch.empty_like(c0) if c0 is not None else None
        workspace = torch.empty(ctx.workspace_bytes, dtype=torch.uint8)
        del workspace, copies
        x_copy = _batch_first_copy(x, ctx.batch_first)
        flat_grad = torch.empty(sum(math.prod(shape) for shape, _ in ctx.shapes), dtype=x.dtype)
        workspace = torch.empty(ctx.workspace_bytes, dtype=torch.uint8)
        del workspace, x_copy
        grads, offset = [], 0
        for shape, dtype in ctx.shapes:  # views of the flat buffer (copies when autocast cast them)
            n = math.prod(shape)
            grads.append(flat_grad[offset : offset + n].view(shape).to(dtype))
            offset += n
        del saved, flat_grad
        return (None, None, grad_x.to(ctx.input_dtype), grad_h, grad_c, *grads)
