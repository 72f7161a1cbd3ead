"""What `train.compile` changes in a step's memory, applied to the eager trace.

Two effects, both measured on one H100 (GPT-2-small, mb 16: 8.87 GiB compiled, 16.47 eager):

- **The loss fuses into the model's graph** (launcher/parallel/with_loss.py): Inductor reads the logits
  once in a reduction kernel, so the fp32 upcast, log-probabilities and their gradient never exist.
  The loss holds the model's output (kept for backward); in backward its gradient takes the output's
  buffer (Inductor reuses a buffer that dies in the kernel that writes the new one).
- **The partitioner saves less for backward**: AOTAutograd's min-cut partitioner recomputes cheap ops
  (pointwise, casts, normalisations, activations) in backward instead of saving their outputs, as long
  as their inputs are saved anyway; matmuls, convolutions, attention and random ops are never redone.
  Nor is a cheap op whose output an unfusible op (a matmul, convolution, attention) reads: backward
  would have to materialise it again in full, so it is saved (the partitioner's "materialized in
  backward" ban). That keeps the bf16 casts of weights, the casts of normalised activations and the
  attention output's contiguous copy that feed matmuls: shown per tensor by running torch's own
  partitioner with Inductor's decompositions on GPT (the 0.51 GiB the rule without the ban missed on
  GPT-2-small, mb 16). `keep_what_compile_saves` applies these rules to the tensors the eager forward
  left alive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: trace.py imports this module
    from launcher.memory.trace import LiveBytes

aten = torch.ops.aten
# Not tagged pointwise, yet fused and recomputed by Inductor (views share their input's storage).
RECOMPUTABLE = {
    aten._to_copy.default,
    aten.clone.default,
    aten.native_layer_norm.default,
    aten.native_group_norm.default,
    aten.gelu.default,
    aten.silu.default,
    aten._softmax.default,
    aten._log_softmax.default,
    aten.cat.default,
    aten.sum.dim_IntList,
    aten.mean.dim,
}
MAX_RECOMPUTE_DEPTH = 6
"""Longest chain of ops the model lets backward redo from saved tensors."""


def recomputable(func: Any) -> bool:
    """Whether Inductor's partitioner may redo `func` in backward rather than save its output."""
    if func in RECOMPUTABLE:
        return True
    tags = getattr(func, "tags", ())
    return torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags


def fusible(func: Any) -> bool:
    """Whether Inductor can fuse `func` with its neighbours (random ops too: their mask is recomputed
    from the seed); the inputs of other ops are materialised in backward."""
    tags = getattr(func, "tags", ())
    return recomputable(func) or getattr(func, "is_view", False) or torch.Tag.nondeterministic_seeded in tags


def keep_what_compile_saves(
    tracker: LiveBytes, tags: tuple[str, ...] = ("forward", "autocast copies")
) -> int:
    """Stop counting the live tensors (of `tags`) that a compiled graph would recompute in backward
    from what it saves anyway; returns the bytes no longer counted. Needs `tracker.record_producers`
    on during the forward."""
    live = tracker.live_entries()
    producers = tracker.producers
    dropped: set[int] = set()
    memo: dict[int, bool] = {}

    def available(serial: int, depth: int) -> bool:
        """Alive and kept, or redoable from such tensors by recomputable ops."""
        if serial in live and serial not in dropped:
            return True
        if serial in memo:
            return memo[serial]
        ok, inputs = producers.get(serial, (False, ()))
        result = ok and depth < MAX_RECOMPUTE_DEPTH and all(available(i, depth + 1) for i in inputs)
        memo[serial] = result
        return result

    for serial in sorted(live):  # inputs before the tensors made from them
        tag, _ = live[serial]
        ok, inputs = producers.get(serial, (False, ()))
        if serial in tracker.read_by_unfusible:
            continue
        if tag in tags and ok and inputs and all(available(i, 1) for i in inputs):
            dropped.add(serial)
    return tracker.forget(dropped)


def fused_loss(loss_fn: Callable, outputs: Any, targets: Any, tracker: LiveBytes) -> torch.Tensor:
    """The recipe's loss as Inductor runs it when compiled with the model (module docstring).
    Outputs that are not one tensor keep the eager loss."""
    if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
        return loss_fn(outputs, targets)
    return _FusedLoss.apply(outputs, targets, loss_fn, tracker)


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outputs, targets, loss_fn, tracker):  # noqa: ANN001
        with tracker.fused():
            loss = loss_fn(outputs, targets)
        ctx.save_for_backward(outputs)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        # Inductor writes the outputs' gradient into their own buffer: the kernel reads each element
        # once, and nothing reads the outputs after it (buffer reuse). No new allocation.
        (outputs,) = ctx.saved_tensors
        return outputs.detach(), None, None, None
