"""CUDA graphs for a comm hook's per-bucket arithmetic: one launch instead of dozens.

PowerSGD's work per bucket is a few dozen small kernels (error feedback, a batched orthonormalisation,
the P and Q products). Launched one by one from Python each costs 10-25 us of host time on an H200,
more than its arithmetic: about 1 ms per bucket, on the thread that also launches the backward pass
(bench/RESULTS.md). Captured once into a CUDA graph, a segment replays with one launch.

A segment is captured on the second call that finds the same tensors (data pointers) as the call
before it, so the first, one-off calls (fresh state, DDP still settling its buckets, an fp16 wrapper's
new buffer every step) stay eager; until then, off the GPU, and wherever capture fails, it runs eagerly.
Collectives are never inside a segment: the hook issues them between segments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)


class SegmentGraphs:
    """Run named segments eagerly or as CUDA graphs keyed by the tensors they touch (see module doc)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._graphs: dict[Hashable, tuple[Hashable, torch.cuda.CUDAGraph]] = {}
        self._last_key: dict[Hashable, Hashable] = {}
        self._failed: set[Hashable] = set()

    def run(self, name: Hashable, key: Hashable | None, segment: Callable[[], None], cuda: bool) -> None:
        """Run `segment` (on the current, non-default CUDA stream); `key=None` means: always eagerly."""
        if not (cuda and self.enabled) or key is None or name in self._failed:
            segment()
            return
        graph = self._graphs.get(name)
        if graph is not None and graph[0] == key:
            graph[1].replay()
            return
        if self._last_key.get(name) != key:  # tensors moved (or first call): not yet stable
            self._last_key[name] = key
            self._graphs.pop(name, None)
            segment()
            return
        captured = self._capture(name, segment)
        if captured is None:
            segment()
            return
        self._graphs[name] = (key, captured)
        captured.replay()  # capturing records the kernels; this runs them

    def _capture(self, name: Hashable, segment: Callable[[], None]) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the autograd engine keeps launching backward kernels from its own thread.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                segment()
            finally:
                graph.capture_end()
        except RuntimeError as err:
            self._failed.add(name)
            log.warning("comm hook: CUDA graph capture of %s failed (%s); it runs eagerly", name, err)
            return None
        return graph
