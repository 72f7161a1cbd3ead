"""Memory of a sharded (FSDP2) step, per rank: the recipe's real step traced under fake tensors with
FSDP's life cycle of each unit played alongside.

The trace is launcher/memory/step_trace.py's (the real forward, loss, backward and optimizer step),
counted by a tracker that weights what FSDP shards: parameters, gradients, optimizer state and the
optimizer's temporaries count 1/dp_shard (0 on the GPU under offload; gradients whole while
accumulating unsharded). Module hooks on every unit (pre, each block, post, the root, as
launcher/parallel/fsdp.py shards them) add what FSDP allocates around them, at the moment it does:

- all-gathered parameters: a unit's unsharded parameters (param_dtype) plus its all-gather input, from
  its forward until its reshard (after forward, or after backward for the last block, post and the
  root, and under reshard_after_forward=false); gathered again in backward, with the next unit's
  all-gather prefetched while one computes;
- unsharded gradients of the unit whose backward runs (param_dtype), until its reduce-scatter copies
  them in;
- reduce-scatter buffers (reduce_dtype: the unsharded input and the sharded output; with hybrid
  sharding the replicas' all-reduce too), the previous unit's still in flight while the next is issued.

The peak is searched over this weighted total, so it may fall at another moment than the unsharded
step's (e.g. the optimizer step stops dominating once its state is sharded). autocast's weight copies
vanish when parameters are gathered in the autocast dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from launcher.config.schema import Config
from launcher.memory.cuda_kernels import CudaKernels
from launcher.memory.step_trace import (
    CATEGORIES,
    CUDA,
    _autocast,
    _create_optimizer_state,
    _reserved_extra,
    build_meta_model,
    fake_batch,
    fake_mode,
    materialize,
    model_forward,
)
from launcher.memory.trace import WORKSPACE, LiveBytes, allocated_bytes
from launcher.recipe import block_layout
from launcher.train.optim import build_optimizer
from launcher.train.precision import DTYPES

if TYPE_CHECKING:
    from launcher.parallel.fsdp import Unit

GATHERED, UNSHARDED_GRADS, REDUCE = "all-gathered parameters", "unsharded gradients", "reduce-scatter buffers"
# Trace tags -> the estimate's part names (sharded states say so).
NAMES = {
    **CATEGORIES,
    "parameters": "parameters (shard)",
    "optimizer state": "optimizer state (shard)",
    "optimizer step": "optimizer step temporaries (shard)",
    GATHERED: "all-gathered parameters (in flight)",
    UNSHARDED_GRADS: "unsharded gradients (in flight)",
    REDUCE: "reduce-scatter buffers",
}


ORDER = (
    "parameters (shard)",
    "gradients (shard)",
    "gradients (unsharded, accumulating)",
    "optimizer state (shard)",
    "all-gathered parameters (in flight)",
    "unsharded gradients (in flight)",
    "reduce-scatter buffers",
    "autocast weight copies",
    "activations",
    "loss temporaries (logits, loss)",
    "backward temporaries",
    "optimizer step temporaries (shard)",
)


@dataclass(frozen=True)
class Sharding:
    """What the memory of a sharded step depends on."""

    shard: int
    replicate: int
    param_bytes: int
    """Bytes per element of gathered parameters (param_dtype)."""
    reduce_bytes: int
    reshard_after_forward: bool
    offload: bool
    accumulate_unsharded: bool
    """Gradients stay whole between micro-steps (accumulation without reduce_every_micro_step)."""
    blocks_per_unit: int | str = 1

    def weights(self, autocast_copies: bool) -> dict[str, float]:
        state = 0.0 if self.offload else 1 / self.shard
        return {
            "parameters": state,
            "optimizer state": state,
            "optimizer step": state,
            "gradients": 1.0 if self.accumulate_unsharded else state,
            "autocast copies": 1.0 if autocast_copies else 0.0,
        }


def sharding_of(cfg: Config, world_size: int) -> Sharding:
    from launcher.parallel.fsdp import ShardDims, mp_policy, reshards_after_forward

    p = cfg.parallel
    dims = ShardDims.resolve(p.dp_replicate, p.dp_shard, world_size)
    policy = mp_policy(cfg.precision, p.param_dtype, p.reduce_dtype)
    param = policy.param_dtype or torch.float32
    return Sharding(
        dims.shard,
        dims.replicate,
        param.itemsize,
        (policy.reduce_dtype or param).itemsize,
        reshards_after_forward(p.reshard_after_forward, dims),
        p.offload,
        cfg.train.grad_accum_steps > 1 and not p.reduce_every_micro_step,
        getattr(p, "blocks_per_unit", 1),  # pipeline stages shard per block
    )


class ShardedLiveBytes(LiveBytes):
    """LiveBytes whose total (and peak) weights each tag: sharded states count their shard."""

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.weights = weights

    @property
    def total(self) -> int:
        return int(sum(v * self.weights.get(k, 1.0) for k, v in self.live.items()))

    def _maybe_peak(self, workspace: int = 0) -> None:
        """As LiveBytes', with sharded tags weighted; `workspace`: a running kernel's, unsharded."""
        if self._hold_peak:
            return
        total = self.total + workspace
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = {k: int(v * self.weights.get(k, 1.0)) for k, v in self.live.items() if v}
            if workspace:
                self.peak_breakdown[WORKSPACE] = workspace
            self.peak_phase = self.phase

    def _allocated(self, nbytes: int, tag: str) -> int:
        """A sharded tag's storage is its shard to the allocator (a re-tagged gradient: the whole freed,
        the shard allocated; LiveBytes.register)."""
        return allocated_bytes(int(nbytes * self.weights.get(tag, 1.0)))

    def add(self, tag: str, nbytes: int) -> None:
        """Bytes FSDP allocates (or, negative, frees) outside the traced ops."""
        self.live[tag] += nbytes
        if nbytes > 0:
            self._maybe_peak()


class UnitLifecycle:
    """FSDP's per-unit allocations, driven by module hooks during the traced step."""

    def __init__(self, units: list[Unit], s: Sharding, tracker: ShardedLiveBytes):
        self.units, self.s, self.tracker = units, s, tracker
        self.gathered: dict[str, int] = {}
        self.unsharded_grads: dict[str, int] = {}
        self.reduce_in_flight: list[int] = []
        self.sync = True
        self.hooks: list[Any] = []
        for i, unit in enumerate(units):
            name, first, last = unit.name, unit.modules[0], unit.modules[-1]
            previous = units[i - 1].name if i > 0 else None
            self.hooks += [  # a unit of several blocks: gathered before its first, backward ends at it
                first.register_forward_pre_hook(lambda m, a, name=name: self.gather(name)),
                last.register_forward_hook(
                    lambda m, a, o, name=name, r=unit.reshards: self.release(name) if r else None
                ),
                last.register_full_backward_pre_hook(
                    lambda m, g, name=name, prev=previous: self.backward_begins(name, prev)
                ),
                first.register_full_backward_hook(lambda m, gi, go, name=name: self.backward_ends(name)),
            ]
        self.numel = {unit.name: unit.numel for unit in units}

    def gather(self, name: str | None) -> None:
        if name is None or name in self.gathered or not self.numel[name]:
            return
        n = self.numel[name]
        size = allocated_bytes(n * self.s.param_bytes) + allocated_bytes(
            -(-n // self.s.shard) * self.s.param_bytes
        )
        self.gathered[name] = size
        self.tracker.add(GATHERED, size)

    def release(self, name: str) -> None:
        if name in self.gathered:
            self.tracker.add(GATHERED, -self.gathered.pop(name))

    def backward_begins(self, name: str, previous: str | None) -> None:
        self.gather(name)
        if previous is not None and previous != "root":
            self.gather(previous)  # the next unit to run backward, prefetched
        if not self.s.accumulate_unsharded and self.numel[name] and name not in self.unsharded_grads:
            size = allocated_bytes(self.numel[name] * self.s.param_bytes)
            self.unsharded_grads[name] = size
            self.tracker.add(UNSHARDED_GRADS, size)

    def backward_ends(self, name: str) -> None:
        self.release(name)  # reshard after backward
        if name in self.unsharded_grads:
            self.tracker.add(UNSHARDED_GRADS, -self.unsharded_grads.pop(name))
        if self.sync and self.numel[name]:
            n = self.numel[name]
            size = allocated_bytes(n * self.s.reduce_bytes) + allocated_bytes(
                -(-n // self.s.shard) * self.s.reduce_bytes
            ) * (2 if self.s.replicate > 1 else 1)
            self.tracker.add(REDUCE, size)
            self.reduce_in_flight.append(size)
            while len(self.reduce_in_flight) > 2:  # the one before the previous has finished
                self.tracker.add(REDUCE, -self.reduce_in_flight.pop(0))

    def backward_done(self) -> None:
        for name in list(self.gathered):
            self.release(name)
        for name in list(self.unsharded_grads):
            self.tracker.add(UNSHARDED_GRADS, -self.unsharded_grads.pop(name))
        while self.reduce_in_flight:
            self.tracker.add(REDUCE, -self.reduce_in_flight.pop())

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def trace_sharded_step(cfg: Config, recipe: Any, sample: Any, s: Sharding) -> dict[str, Any]:
    """The weighted peak of one optimizer step (min(accumulation, 2) micro-steps) under FSDP."""
    train, amp = cfg.train, DTYPES[cfg.precision.dtype]
    micro_steps = min(train.grad_accum_steps, 2)
    meta = build_meta_model(recipe, train.activation_checkpointing)
    with fake_mode():
        model = materialize(meta)
        batch = fake_batch(sample, train.micro_batch_size)
        forward = model_forward(recipe.loss)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(
            model.named_parameters(), cfg.optim, torch.device("cpu") if s.offload else CUDA
        )
        for group in optimizer.param_groups:
            if not group.get("fused"):
                group["foreach"] = True
        _create_optimizer_state(params, optimizer)
        tracker = ShardedLiveBytes(s.weights(autocast_copies=amp is not None and s.param_bytes == 4))
        for p in model.parameters():
            tracker.register(p, "parameters")
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    tracker.register(value, "optimizer state")
        for t in batch:
            tracker.register(t, "inputs")
        from launcher.parallel.fsdp import plan_units

        units = plan_units(model, block_layout(recipe), s.reshard_after_forward, s.blocks_per_unit)
        life = UnitLifecycle(units, s, tracker)
        grad_hooks = [
            p.register_post_accumulate_grad_hook(lambda p: tracker.register(p.grad, "gradients"))
            for p in params
        ]
        activations = 0
        step_start = len(tracker.events)
        try:
            with tracker, CudaKernels():  # attention, dropout, LSTM as CUDA runs them
                for i in range(micro_steps):
                    life.sync = i == micro_steps - 1 or not s.accumulate_unsharded
                    tracker.phase = "forward"
                    with _autocast(amp):
                        loss = forward(model, batch, tracker)
                    if i == 0:
                        activations = tracker.live["forward"]
                    tracker.phase = "backward"
                    with warnings.catch_warnings():  # "full backward hook ... no inputs require gradients"
                        warnings.simplefilter("ignore", UserWarning)
                        (loss / micro_steps).backward()
                    del loss
                    life.backward_done()
                tracker.phase = "optimizer step"
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            life.remove()
            for hook in grad_hooks:
                hook.remove()
        numel = sum(p.numel() for p in params)
        state_bytes = sum(
            allocated_bytes(v.untyped_storage().nbytes())
            for st in optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
        at_peak: dict[str, int] = {}
        for tag, size in tracker.peak_breakdown.items():
            name = NAMES.get(tag, "other temporaries")
            if tag == "gradients":
                name = (
                    "gradients (unsharded, accumulating)" if s.accumulate_unsharded else "gradients (shard)"
                )
            at_peak[name] = at_peak.get(name, 0) + size
        largest = max((u.numel for u in units if u.name != "root"), default=0)
        return {
            "at_peak": at_peak,
            "peak_phase": tracker.peak_phase,
            "activations": activations,
            "parameters": numel,
            "optimizer_state": state_bytes,
            "units": sum(1 for u in units if u.numel),
            "largest_unit": largest,
            "reserved_extra": {e: _reserved_extra(tracker, step_start, e) for e in (True, False)},
        }


def shard_pipeline_ranks(cfg: Config, ranks: list[Any]) -> None:
    """PP x FSDP (parallel.dp_shard > 1): each pipeline rank's states in shards, its stage gathered whole.

    Closed form over the per-stage trace: parameters, optimizer state and its temporaries count
    1/dp_shard; gradients stay whole (torch's schedules accumulate them unsharded over the micro-batches
    and reduce-scatter after the last); the stage's parameters are gathered (param_dtype) for the whole
    schedule step (reshard_after_forward=false) and autocast's copies of them vanish in bf16/fp16.
    """
    from launcher.config.schema import FSDPDtype
    from launcher.parallel.fsdp import mp_policy

    shard = cfg.parallel.dp_shard
    if shard <= 1:
        return
    policy = mp_policy(cfg.precision, FSDPDtype.auto, FSDPDtype.auto)
    param_bytes = (policy.param_dtype or torch.float32).itemsize
    for rank in ranks:
        parts = rank.parts
        for key in ("parameters", "optimizer state", "optimizer step temporaries"):
            if key in parts:
                parts[key] = -(-parts[key] // shard)
        if param_bytes < 4:
            parts["autocast weight copies"] = 0
        stage = rank.notes.get("parameter bytes", 0)
        parts["all-gathered parameters (in flight)"] = (
            stage // 4 * param_bytes + -(-stage // shard) // 4 * param_bytes
        )
        rank.notes["sharding"] = f"dp_shard={shard}"
        rank.notes["parameter bytes"] = -(-stage // shard)
        rank.notes["optimizer state bytes"] = -(-rank.notes.get("optimizer state bytes", 0) // shard)
