"""One optimizer step of the real model, loss and optimizer, traced under fake tensors.

The recipe's model is built on the meta device and materialised as fake tensors (shapes and dtypes,
no storage), so a 7B-shaped model costs no memory. The step is the launcher's own: the recipe's
forward and loss under autocast, activation checkpointing as `launcher.train.activation_checkpointing`
applies it, backward, and the optimizer `launcher.train.optim` builds (fused AdamW / foreach SGD, as on
CUDA). Optimizer state is created first, so the traced step is a steady-state one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from launcher.config.schema import OptimConfig
from launcher.memory.caching_allocator import replay, training_order
from launcher.memory.compiled import fused_loss, keep_what_compile_saves
from launcher.memory.cuda_kernels import CudaKernels
from launcher.memory.parts import CUBLAS_WORKSPACE_BYTES, CUBLASLT_WORKSPACE_BYTES
from launcher.memory.trace import WORKSPACE, LiveBytes, allocated_bytes
from launcher.recipe import block_layout, resolve_blocks
from launcher.train.activation_checkpointing import checkpoint_blocks
from launcher.train.optim import build_optimizer

CUDA = torch.device("cuda")
# Trace categories, in the order the estimate prints them.
CATEGORIES = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer state": "optimizer state",
    "autocast copies": "autocast weight copies",
    "forward": "activations",
    "logits": "loss temporaries (logits, loss)",
    "loss": "loss temporaries (logits, loss)",
    "backward": "backward temporaries",
    "optimizer step": "optimizer step temporaries",
    "inputs": "inputs",
    "setup": "inputs",
    WORKSPACE: "kernel workspace (cuDNN)",
}


@dataclass
class StepTrace:
    """Bytes (as the CUDA caching allocator counts them) of one traced optimizer step."""

    parameters: int
    gradients: int
    optimizer_state: int
    peak: int
    """Allocated bytes at the step's highest moment."""
    at_peak: dict[str, int]
    """What was alive at that moment, by category (sums to `peak`)."""
    peak_without_grads: int
    """The highest moment not counting gradients (DDP keeps them in persistent buckets instead)."""
    at_peak_without_grads: dict[str, int]
    activations: int
    """Saved for backward by one micro-batch's forward (logits and autocast copies not included)."""
    forward_saved: int
    """Everything one micro-batch's forward leaves alive: activations, logits, loss, autocast copies."""
    peak_phase: str
    grad_shapes: list[tuple[int, ...]] = field(default_factory=list)
    reserved_extra: dict[bool, int] = field(default_factory=dict)
    """max_memory_reserved - max_memory_allocated over two steps of training, by expandable_segments:
    the caching allocator model replaying this trace's allocations (launcher/memory/caching_allocator.py)."""


def fake_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


def materialize(module: nn.Module) -> nn.Module:
    """Replace a meta-device module's parameters and buffers by fake CPU tensors, in place (tied
    weights stay tied); call inside `fake_mode()`. `to_empty` cannot: it swaps tensors, and fake
    and meta tensors do not swap."""
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in made:
            empty = torch.empty(t.shape, dtype=t.dtype)
            made[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if param else empty
        return made[id(t)]

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = fake(p, True)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = fake(b, False)
    return module


def build_meta_model(recipe: Any, checkpointing: bool):
    """The recipe's model on the meta device, blocks checkpointed as the strategies do it."""
    with torch.device("meta"):
        model = recipe.build_model()
    if checkpointing:
        checkpoint_blocks(resolve_blocks(model, block_layout(recipe)), lambda: (nullcontext(), CudaKernels()))
    return model


def fake_batch(sample: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """A batch of `batch_size` samples shaped like `sample` (inputs, targets); call inside fake_mode()."""
    return [torch.empty((batch_size, *t.shape), dtype=t.dtype) for t in sample]


def trace_step(
    module: nn.Module,
    forward: Callable[[nn.Module, list[torch.Tensor], LiveBytes], torch.Tensor],
    batch: list[torch.Tensor],
    optim_cfg: OptimConfig,
    amp_dtype: torch.dtype | None,
    micro_steps: int = 1,
    compiled: bool = False,
) -> StepTrace:
    """Trace `micro_steps` forward/backward passes and one optimizer step of `module` (fake tensors).

    `forward(module, batch, tracker)` returns a scalar loss, or a non-scalar output whose gradient is taken
    as ones (a pipeline stage before the last). `compiled`: keep for backward only what torch.compile's
    partitioner saves (launcher/memory/compiled.py). Call inside `fake_mode()`.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(module.named_parameters(), optim_cfg, CUDA)
    for group in optimizer.param_groups:
        if not group.get("fused"):
            group["foreach"] = True  # torch's default on CUDA
    _create_optimizer_state(params, optimizer)
    tracker = LiveBytes()
    tracker.record_producers = compiled
    for p in module.parameters():
        tracker.register(p, "parameters")
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):  # fused AdamW keeps even `step` on the GPU
                tracker.register(value, "optimizer state")
    for t in batch:
        tracker.register(t, "inputs")
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: tracker.register(p.grad, "gradients")) for p in params
    ]
    activations = forward_saved = 0
    step_start = len(tracker.events)
    try:
        with tracker, CudaKernels():
            for i in range(micro_steps):
                tracker.phase = "forward"
                with tracker.peak_after() if compiled else nullcontext():
                    with _autocast(amp_dtype):
                        loss = forward(module, batch, tracker)
                    if compiled:
                        keep_what_compile_saves(tracker)
                if i == 0:
                    activations = tracker.live["forward"]
                    forward_saved = sum(
                        tracker.live[k] for k in ("forward", "logits", "loss", "autocast copies")
                    )
                tracker.phase = "backward"
                if loss.dim() == 0:
                    (loss / micro_steps).backward()
                else:
                    loss.backward(torch.ones_like(loss))
                del loss
            tracker.phase = "optimizer step"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for hook in hooks:
            hook.remove()
    state_bytes = sum(
        allocated_bytes(v.untyped_storage().nbytes())
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return StepTrace(
        parameters=sum(allocated_bytes(p.untyped_storage().nbytes()) for p in module.parameters()),
        gradients=sum(allocated_bytes(p.numel() * p.element_size()) for p in params),
        optimizer_state=state_bytes,
        peak=tracker.peak,
        at_peak=_categorise(tracker.peak_breakdown),
        peak_without_grads=tracker.peak_without_grads,
        at_peak_without_grads=_categorise(tracker.breakdown_without_grads),
        activations=activations,
        forward_saved=forward_saved,
        peak_phase=tracker.peak_phase,
        grad_shapes=[tuple(p.shape) for p in params],
        reserved_extra={e: _reserved_extra(tracker, step_start, e) for e in (True, False)},
    )


def _with_early_frees(tracker: LiveBytes, step_start: int) -> tuple[list, list[str]]:
    """The step's events, with what a compiled forward frees early (tracker.early_frees) freed there."""
    frees: dict[int, list[int]] = {}
    for serial, at in tracker.early_frees.items():
        frees.setdefault(at, []).append(serial)
    step, phases = [], []
    for i in range(step_start, len(tracker.events)):
        step.append(tracker.events[i])
        phases.append(tracker.event_phases[i])
        for serial in frees.get(i + 1, ()):  # last read by the op that produced event i's outputs
            step.append((serial, 0))
            phases.append(tracker.event_phases[i])
    return step, phases


def _reserved_extra(tracker: LiveBytes, step_start: int, expandable: bool) -> int:
    """Reserved less allocated when the traced step runs twice after the model is created, the
    optimizer state appearing in the first step's optimizer phase and cuBLAS's workspaces in its
    forward and backward (as torch creates them, lazily)."""
    setup = [e for e, p in zip(tracker.events[:step_start], tracker.event_phases) if p != "optimizer state"]
    state = [e for e, p in zip(tracker.events[:step_start], tracker.event_phases) if p == "optimizer state"]
    step, phases = _with_early_frees(tracker, step_start)
    optimizer_at = next((i for i, p in enumerate(phases) if p == "optimizer step"), len(step))
    backward_at = next((i for i, p in enumerate(phases) if p == "backward"), optimizer_at)
    events = training_order(setup, state, step, optimizer_at)
    # cuBLAS's workspaces, once each: the step thread's as the first step starts, autograd's device
    # thread's as its backward starts (parts.TRAINING_CUBLAS_BYTES)
    events.insert(len(setup) + backward_at, ("cuBLAS workspace, backward", CUBLAS_WORKSPACE_BYTES))
    events.insert(len(setup), ("cuBLAS workspace", CUBLAS_WORKSPACE_BYTES + CUBLASLT_WORKSPACE_BYTES))
    allocated, reserved = replay(events, expandable)
    return max(0, reserved - allocated)


def trace_forward_activations(
    module: nn.Module,
    forward: Callable[[nn.Module, list[torch.Tensor], LiveBytes], torch.Tensor],
    batch: list[torch.Tensor],
    amp_dtype: torch.dtype | None,
    compiled: bool = False,
) -> int:
    """Bytes one forward pass saves for backward (for the 'with/without checkpointing' comparison)."""
    tracker = LiveBytes()
    tracker.record_producers = compiled
    for p in module.parameters():
        tracker.register(p, "parameters")
    with tracker, CudaKernels():
        tracker.phase = "forward"
        with tracker.peak_after() if compiled else nullcontext():
            with _autocast(amp_dtype):
                out = forward(module, batch, tracker)
            if compiled:
                keep_what_compile_saves(tracker)
        saved = tracker.live["forward"]
    del out
    return saved


def model_forward(loss_fn: Callable | None, compiled: bool = False) -> Callable:
    """forward(module, batch, tracker): the model's output (tagged as logits) and, if any, its loss.

    `compiled`: the loss runs as train.compile runs it, in one graph with the model
    (launcher/parallel/with_loss.py), see `fused_loss`.
    """

    def forward(module: nn.Module, batch: list[torch.Tensor], tracker: LiveBytes) -> torch.Tensor:
        out = module(batch[0])
        if loss_fn is None:
            return out
        tracker.register(out, "logits")
        tracker.phase = "loss"
        return fused_loss(loss_fn, out, batch[1], tracker) if compiled else loss_fn(out, batch[1])

    return forward


def _create_optimizer_state(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Step once on zero gradients (untraced) so the optimizer's state exists, as from step 2 on."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()


def _categorise(by_tag: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for tag, size in by_tag.items():
        name = CATEGORIES.get(tag, "other temporaries")
        out[name] = out.get(name, 0) + size
    return out
