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
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

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
        self._refs: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live: Counter[str] = Counter()
        self.phase = "setup"
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.peak_phase = ""
        # The peak without gradients: under DDP gradients live in persistent buckets instead.
        self.peak_without_grads = 0
        self.breakdown_without_grads: dict[str, int] = {}

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
        self.live[entry[0]] -= entry[1]
        self.live[tag] += entry[1]
        entry[0] = tag

    def tag_of(self, tensor: torch.Tensor) -> str | None:
        storage = tensor.untyped_storage()
        entry = self._entries.get(id(storage)) if storage in self._refs else None
        return entry[0] if entry else None

    def _add(self, storage: Any, tag: str) -> None:
        key, size = id(storage), allocated_bytes(storage.nbytes())
        self._entries[key] = [tag, size]
        self._refs[storage] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.live[tag] += size
        self._maybe_peak()

    def _free(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.live[entry[0]] -= entry[1]

    def _maybe_peak(self) -> None:
        total = self.total
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = {k: v for k, v in self.live.items() if v}
            self.peak_phase = self.phase
        rest = total - self.live["gradients"]
        if rest > self.peak_without_grads:
            self.peak_without_grads = rest
            self.breakdown_without_grads = {k: v for k, v in self.live.items() if v and k != "gradients"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        tag = self.phase
        # Autocast's cached low-precision copy of a weight: its own category.
        if func is torch.ops.aten._to_copy.default and self.tag_of(args[0]) == "parameters":
            tag = "autocast copies"
        tree_map_only(torch.Tensor, lambda t: self._track_output(t, tag), out)
        return out

    def _track_output(self, tensor: torch.Tensor, tag: str) -> None:
        storage = tensor.untyped_storage()
        if storage not in self._refs:
            self._add(storage, tag)
