"""Live-bytes tracing of a real training step under fake tensors: nothing is allocated.

`LiveBytes` is a TorchDispatchMode that sees every tensor an op returns, keys its storage weakly and
counts the bytes alive at every moment, as the CUDA caching allocator would (each storage rounded up
to 512 bytes). Each storage is tagged with the phase that created it (forward, loss, backward,
optimizer step), so the breakdown at the peak says what the peak is made of. torch's own
`MemTracker` does the same per module but refuses a module that runs twice in one step, which
gradient accumulation and pipeline micro-batches do; this is the part of it we need.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from launcher.memory.compiled import fusible, recomputable
from launcher.memory.cuda_kernels import workspace_bytes

WORKSPACE = "kernel workspace"
"""Tag of the bytes a kernel takes while it runs (launcher/memory/cuda_kernels.py)."""
ALLOCATOR_ROUND_BYTES = 512
"""The CUDA caching allocator's smallest block: every allocation is a multiple of it."""


def allocated_bytes(nbytes: int, round_to: int = ALLOCATOR_ROUND_BYTES) -> int:
    """Bytes the caching allocator hands out for a request of `nbytes`."""
    return math.ceil(nbytes / round_to) * round_to if nbytes else 0


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created under this mode (and registered ones).

    `phase` is set by the driver; the peak and its breakdown by phase are kept.
    """

    def __init__(self) -> None:
        super().__init__()
        # id(storage) -> [tag, bytes]; the entry leaves when the storage is garbage collected.
        self._entries: dict[int, list] = {}
        # With `record_producers`: serial of a storage -> (recomputable op?, serials of its inputs),
        # for modelling what torch.compile saves for backward (launcher/memory/compiled.py).
        self.record_producers = False
        self.producers: dict[int, tuple[bool, tuple[int, ...]]] = {}
        # ... and the storages read by an op that cannot fuse (matmul, convolution, attention): a
        # compiled backward must have them in memory, so the partitioner saves rather than redoes them.
        self.read_by_unfusible: set[int] = set()
        self._serial = 0
        # Every allocation and free in order, (serial, bytes) / (serial, 0), with the phase it happened
        # in: the caching allocator model replays them (launcher/memory/caching_allocator.py).
        self.events: list[tuple[object, int]] = []
        self.event_phases: list[str] = []
        # With `record_producers`: where in `events` each storage was last read, and the storages a
        # compiled graph frees right after that (`forget`) rather than keeping for backward.
        self.last_use: dict[int, int] = {}
        self.early_frees: dict[int, int] = {}
        self._refs: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live: Counter[str] = Counter()
        self.phase = "setup"
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_phase = ""
        # The peak without gradients: under DDP gradients live in persistent buckets instead.
        self.peak_without_grads = 0
        self.breakdown_without_grads: dict[str, int] = {}
        self._fused = 0
        self._hold_peak = 0

    @property
    def total(self) -> int:
        return sum(self.live.values())

    def register(self, tensor: torch.Tensor, tag: str) -> None:
        """Count an existing tensor (parameters, inputs) under `tag`, or re-tag one already counted."""
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage)) if storage in self._refs else None
        if entry is None:
            self._add(storage, tag)
            return
        old, new = self._allocated(entry[1], entry[0]), self._allocated(entry[1], tag)
        if entry[1] and old != new:  # e.g. a gradient, once accumulated, becomes its shard
            self._event(entry[2], 0)
            self._event(entry[2], new)
        self.live[entry[0]] -= entry[1]
        self.live[tag] += entry[1]
        entry[0] = tag

    def tag_of(self, tensor: torch.Tensor) -> str | None:
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage)) if storage in self._refs else None
        return entry[0] if entry else None

    def serial_of(self, tensor: torch.Tensor) -> int | None:
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage)) if storage in self._refs else None
        return entry[2] if entry else None

    def live_entries(self) -> dict[int, tuple[str, int]]:
        """serial -> (tag, bytes) of every storage alive now."""
        return {e[2]: (e[0], e[1]) for e in self._entries.values() if e[1]}

    def forget(self, serials: set[int]) -> int:
        """Stop counting these live storages (a compiled graph would not have kept them); bytes freed."""
        freed = 0
        for entry in self._entries.values():
            if entry[2] in serials and entry[1]:
                self.live[entry[0]] -= entry[1]
                freed += entry[1]
                entry[1] = 0
                if entry[2] in self.last_use:  # the allocator gets it back right after its last reader
                    self.early_frees[entry[2]] = self.last_use[entry[2]]
                else:
                    self._event(entry[2], 0)
        return freed

    def _add(self, storage: Any, tag: str) -> None:
        key, size = id(storage), allocated_bytes(storage.nbytes())
        self._serial += 1
        self._entries[key] = [tag, size, self._serial]
        self._refs[storage] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.live[tag] += size
        self._event(self._serial, self._allocated(size, tag), tag if self.phase == "setup" else self.phase)
        self._maybe_peak()

    def _allocated(self, nbytes: int, tag: str) -> int:
        """Bytes the GPU's allocator gets for a storage of `nbytes` tagged `tag` (a sharded tracker's
        shards are smaller)."""
        return nbytes

    def _free(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.live[entry[0]] -= entry[1]
            if entry[1]:
                self._event(entry[2], 0)

    def _event(self, key: object, nbytes: int, phase: str = "") -> None:
        self.events.append((key, nbytes))
        self.event_phases.append(phase or self.phase)

    @contextmanager
    def peak_after(self) -> Iterator[None]:
        """Judge the peak only at the end of the block (a compiled forward keeps less than the eager
        one traced inside it; the caller forgets those tensors before the block ends)."""
        self._hold_peak += 1
        try:
            yield
        finally:
            self._hold_peak -= 1
            self._maybe_peak()

    def _maybe_peak(self, workspace: int = 0) -> None:
        """A new peak? `workspace`: bytes a running kernel holds on top of the live tensors."""
        if self._hold_peak:
            return
        live = {k: v for k, v in self.live.items() if v}
        if workspace:
            live[WORKSPACE] = workspace
        total = sum(live.values())
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = live
            self.peak_phase = self.phase
        rest = total - self.live["gradients"]
        if rest > self.peak_without_grads:
            self.peak_without_grads = rest
            self.breakdown_without_grads = {k: v for k, v in live.items() if k != "gradients"}

    @contextmanager
    def fused(self) -> Iterator[None]:
        """Ops inside run as one compiled kernel: their intermediates never reach the allocator."""
        self._fused += 1
        try:
            yield
        finally:
            self._fused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if self._fused:
            return out
        tag = self.phase
        # Autocast's cached low-precision copy of a weight: its own category.
        if func is torch.ops.aten._to_copy.default and self.tag_of(args[0]) == "parameters":
            tag = "autocast copies"
        tree_map_only(torch.Tensor, lambda t: self._track_output(t, tag), out)
        if self.record_producers:
            self._record_producer(func, args, kwargs, out)
        workspace = workspace_bytes(func, args, out)
        if workspace:
            self._maybe_peak(allocated_bytes(workspace))
            self._event(("workspace", len(self.events)), allocated_bytes(workspace))
            self._event(self.events[-1][0], 0)
        return out

    def _record_producer(self, func, args, kwargs, out) -> None:  # noqa: ANN001
        inputs = tuple(
            s
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and (s := self.serial_of(t)) is not None
        )
        ok = recomputable(func)
        for serial in inputs:
            self.last_use[serial] = len(self.events)
        if not fusible(func) and any(isinstance(t, torch.Tensor) for t in tree_leaves(out)):
            self.read_by_unfusible.update(inputs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                serial = self.serial_of(t)
                if serial is not None and serial not in self.producers and serial not in inputs:
                    self.producers[serial] = (ok, inputs)

    def _track_output(self, tensor: torch.Tensor, tag: str) -> None:
        storage = tensor.untyped_storage()
        if storage not in self._refs:
            self._add(storage, tag)
