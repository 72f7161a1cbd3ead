"""The estimator's trace follows the kernels CUDA runs, not the CPU's (launcher/memory/cuda_kernels.py),
and what torch.compile keeps (launcher/memory/compiled.py). Each test computes the bytes it expects
from the shapes, then checks the trace: no number copied from a GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from launcher.memory.compiled import keep_what_compile_saves
from launcher.memory.cuda_kernels import (
    RESERVE_PAD_BYTES,
    RNN_RESERVE_PER_ELEMENT,
    RNN_WORKSPACE_BYTES,
    CudaKernels,
    attention_backend,
)
from launcher.memory.step_trace import fake_mode, materialize
from launcher.memory.trace import LiveBytes, allocated_bytes
from recipes.gpt import Block, GPTModelConfig

B, T, D, H = 2, 64, 32, 4  # batch, sequence, width, heads


def trace_forward(module: nn.Module, x: torch.Tensor, compiled: bool = False, amp=None) -> LiveBytes:
    """Forward of `module` under fake tensors; returns the tracker with what the forward left alive."""
    tracker = LiveBytes()
    tracker.record_producers = compiled
    for p in module.parameters():
        tracker.register(p, "parameters")
    tracker.register(x, "inputs")
    with tracker, CudaKernels(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        tracker.phase = "forward"
        tracker.out = module(x)
        if compiled:
            keep_what_compile_saves(tracker)
    return tracker


def block(dropout: float) -> nn.Module:
    cfg = GPTModelConfig(vocab_size=256, seq_len=T, d_model=D, n_layers=1, n_heads=H, dropout=dropout)
    with torch.device("meta"):
        b = Block(cfg)
    return materialize(b)


def test_attention_with_dropout_keeps_masks_not_the_score_matrix():
    """CPU's math path would keep (B, H, T, T) probabilities and masks; the fused kernel keeps its
    output and log-sum-exp, so dropout adds exactly its two residual dropouts' masks, one byte per
    element as CUDA's fused dropout saves them (the CPU's would be fp32 noise)."""
    with fake_mode():
        x = torch.empty(B, T, D, requires_grad=True)
        plain = trace_forward(block(0.0), x).live["forward"]
        dropped = trace_forward(block(0.1), x).live["forward"]
    assert dropped - plain == 2 * allocated_bytes(B * T * D)


def test_attention_backend_follows_cuda_rules():
    assert attention_backend(torch.bfloat16, 64, has_mask=True, dropout_p=0.1) == "cudnn"
    assert attention_backend(torch.float16, 256, has_mask=False, dropout_p=0.0) == "flash"
    assert attention_backend(torch.float32, 64, has_mask=False, dropout_p=0.0) == "efficient"


def test_masked_attention_keeps_one_additive_bias_of_the_mask_shape():
    """A boolean (B, 1, T, T) mask becomes one bias of that shape in the compute dtype, kept for
    backward with the output and log-sum-exp; scores are never materialised (H times bigger)."""

    class Masked(nn.Module):
        def forward(self, q):
            mask = torch.ones(B, 1, T, T, dtype=torch.bool)
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.1)

    with fake_mode():
        q = torch.empty(B, H, T, D // H, requires_grad=True)
        tracker = trace_forward(Masked(), q)
    out, lse = B * H * T * (D // H) * 4, B * H * T * 4  # fp32: memory-efficient attention
    bias, seeds = B * T * T * 4, 2 * 512  # the mask itself is freed once converted
    assert tracker.live["forward"] == sum(allocated_bytes(n) for n in (out, lse, bias)) + seeds


def test_convolution_workspace_counts_at_its_moment():
    """cuDNN takes about input + output bytes while a convolution runs: the peak includes it."""
    with fake_mode():
        conv = materialize(_meta(lambda: nn.Conv2d(8, 16, 3, padding=1, bias=False)))
        x = torch.empty(4, 8, 32, 32)
        tracker = trace_forward(conv, x)
    weight, inp, out = 16 * 8 * 9 * 4, 4 * 8 * 32 * 32 * 4, 4 * 16 * 32 * 32 * 4
    live = sum(allocated_bytes(n) for n in (weight, inp, out))
    assert tracker.peak == live + allocated_bytes(inp + out)


def test_lstm_keeps_cudnn_reserve_and_takes_its_workspace():
    """cuDNN LSTM: output, initial and final states and a reserve of 5 x batch x steps x hidden
    elements stay for backward; the workspace and the (steps, batch) copy of a batch-first input are
    momentary, taken around the outputs and alive with the reserve (aten's _cudnn_rnn order), so the
    peak holds all of them."""
    hidden, steps = 32, 16
    with fake_mode():
        lstm = materialize(_meta(lambda: nn.LSTM(hidden, hidden, batch_first=True)))
        x = torch.empty(B, steps, hidden, requires_grad=True)
        tracker = trace_forward(lstm, x)
    elements = B * steps * hidden
    reserve = RNN_RESERVE_PER_ELEMENT["lstm"] * elements * 4 + RESERVE_PAD_BYTES
    kept = [reserve, elements * 4] + [B * hidden * 4] * 4
    assert tracker.live["forward"] == sum(allocated_bytes(n) for n in kept)
    weights = sum(allocated_bytes(p.numel() * 4) for p in lstm.parameters())
    before = weights + allocated_bytes(elements * 4) + 2 * allocated_bytes(B * hidden * 4)  # x, h0, c0
    workspace = allocated_bytes(elements * RNN_WORKSPACE_BYTES[("lstm", False)][0])
    returned = [elements * 4] + [B * hidden * 4] * 2  # output, final h and c
    copy = allocated_bytes(elements * 4)  # the input, transposed to (steps, batch, features)
    assert tracker.peak == before + copy + sum(allocated_bytes(n) for n in [*returned, reserve]) + workspace


def test_lstm_backward_holds_its_gradients_with_the_workspace():
    """cuDNN LSTM backward: the input gradients (with copies of the batch-first input and output
    gradient), then the weights' gradients as one flat buffer (with a copy of the input), each while a
    workspace is taken; the reserve and output stay alive until it returns."""
    hidden, steps = 32, 16
    with fake_mode():
        lstm = materialize(_meta(lambda: nn.LSTM(hidden, hidden, batch_first=True)))
        x = torch.empty(B, steps, hidden, requires_grad=True)
        tracker = trace_forward(lstm, x)
        tracker.peak = 0
        with tracker, CudaKernels():
            tracker.phase = "backward"
            tracker.out[0].sum().backward()
    elements = B * steps * hidden
    weights = sum(allocated_bytes(p.numel() * 4) for p in lstm.parameters())
    flat_grad = allocated_bytes(sum(p.numel() for p in lstm.parameters()) * 4)
    workspace = allocated_bytes(elements * RNN_WORKSPACE_BYTES[("lstm", False)][0])
    x_bytes, state = allocated_bytes(elements * 4), allocated_bytes(B * hidden * 4)
    reserve = allocated_bytes(RNN_RESERVE_PER_ELEMENT["lstm"] * elements * 4 + RESERVE_PAD_BYTES)
    # weights, x, h0, c0, the saved output and final states, the reserve; then dx, dh, dc and a
    # workspace with the copies of x and the output gradient, or with one copy of x and the flat dW.
    # Beside them only 512-byte blocks: the loss's gradient and the zero gradients autograd makes for
    # the unused final states.
    alive = weights + x_bytes + 2 * state + x_bytes + 2 * state + reserve
    expected = alive + x_bytes + 2 * state + workspace + max(2 * x_bytes, x_bytes + flat_grad)
    assert 0 <= tracker.peak - expected <= 4 * 512


def _forward_kept(rnn: nn.Module, hidden: int, steps: int, amp=None) -> tuple[int, LiveBytes]:
    with fake_mode():
        module = materialize(_meta(lambda: rnn))
        x = torch.empty(B, steps, hidden, requires_grad=True)
        return B * steps, trace_forward(module, x, amp=amp)


def test_gru_and_plain_rnn_keep_their_own_reserve():
    """A GRU keeps 6 values per hidden unit and step for backward, a tanh RNN one, in the compute
    dtype; each returns its output and final state (no cell state)."""
    hidden, steps = 32, 16
    for mode, make, per_unit in (("gru", nn.GRU, 6), ("rnn_tanh", nn.RNN, 1)):
        rows, tracker = _forward_kept(make(hidden, hidden, batch_first=True), hidden, steps)
        reserve = per_unit * rows * hidden * 4 + RESERVE_PAD_BYTES
        kept = [reserve, rows * hidden * 4] + [B * hidden * 4] * 2  # + output, h0 and the final h
        assert tracker.live["forward"] == sum(allocated_bytes(n) for n in kept), mode


def test_lstm_layers_and_projection_keep_what_cudnn_keeps():
    """Two layers keep the lower layer's output besides each layer's gates; a projection to p keeps
    h + p more per step and makes the output and hidden state p wide. bf16 autocast: the reserve and
    output in bf16, plus the flat bf16 copy of the weights."""
    hidden, steps, proj = 32, 16, 8
    rows, tracker = _forward_kept(nn.LSTM(hidden, hidden, num_layers=2, batch_first=True), hidden, steps)
    reserve = (2 * 5 * hidden + hidden) * rows * 4 + RESERVE_PAD_BYTES  # 4 gates + cell a layer
    kept = [reserve, rows * hidden * 4] + [2 * B * hidden * 4] * 4
    assert tracker.live["forward"] == sum(allocated_bytes(n) for n in kept)
    lstm = nn.LSTM(hidden, hidden, batch_first=True, proj_size=proj)
    rows, tracker = _forward_kept(lstm, hidden, steps, amp=torch.bfloat16)
    reserve = (5 * hidden + hidden + proj) * rows * 2 + RESERVE_PAD_BYTES
    flat = sum(p.numel() for p in lstm.parameters()) * 2
    # reserve, the bf16 input, output and flat weights; h0 (p wide) and c0 (h wide) and their finals
    kept = [reserve, rows * hidden * 2, rows * proj * 2, flat, B * proj * 4, B * hidden * 4]
    kept += [B * proj * 2, B * hidden * 2]
    assert tracker.live["forward"] == sum(allocated_bytes(n) for n in kept)


class SiluMLP(nn.Module):
    """fc2(sigmoid(h) * h), h = fc1(x): the sigmoid's output is read by a pointwise op only, the
    product by a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.sigmoid(h) * h)


def saved_by_torch_partitioner(module: nn.Module, x: torch.Tensor) -> int:
    """Allocated bytes of the activations torch's own min-cut partitioner, with Inductor's
    decompositions, saves for backward (inputs and parameters left out): the reference."""
    from functools import partial

    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    saved: list[torch.Tensor] = []

    def forward_compiler(gm, example_inputs):  # noqa: ANN001
        outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
        inputs = {id(n.meta["val"].untyped_storage()) for n in gm.graph.nodes if n.op == "placeholder"}
        storages = {}
        for node in outputs[1:]:  # [0] is the model's output; the rest is saved for backward
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and id(val.untyped_storage()) not in inputs:  # views too
                storages.setdefault(id(val.untyped_storage()), val)
        saved.extend(storages.values())
        return gm

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda gm, _: gm,
        partition_fn=partial(min_cut_rematerialization_partition, compiler="inductor"),
        decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    torch.compile(module, backend=backend)(x).sum().backward()
    return sum(allocated_bytes(t.untyped_storage().nbytes()) for t in saved)


def test_compiled_forward_saves_what_torch_partitioner_saves():
    """The partitioner model against torch's partitioner itself: the sigmoid's output is redone from
    the (kept) matmul output; the product, which a matmul reads in backward, is saved although it
    could be redone (the partitioner's materialized-in-backward ban)."""
    torch.manual_seed(0)
    reference = saved_by_torch_partitioner(SiluMLP(), torch.randn(B, T, D, requires_grad=True))
    with fake_mode():
        model = materialize(_meta(SiluMLP))
        x = torch.empty(B, T, D, requires_grad=True)
        eager = trace_forward(model, x)
        compiled = trace_forward(model, x, compiled=True)
    hidden, output = allocated_bytes(B * T * 4 * D * 4), allocated_bytes(B * T * D * 4)
    assert reference == 2 * hidden  # fc1's output and the product
    assert compiled.live["forward"] - output == reference
    assert eager.live["forward"] - compiled.live["forward"] == hidden  # the sigmoid's output


def _meta(make):
    with torch.device("meta"):
        return make()
