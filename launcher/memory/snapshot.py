"""Allocator history snapshots (memory.record_history): memory_snapshot_rank<r>.pickle in the run dir.

Open the pickle at https://pytorch.org/memory_viz (drag and drop; it stays in the browser). An HTML
file is written beside it by torch's own `_memory_viz.trace_plot`; that page loads its viewer
script from a CDN, so it needs a network connection to display.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from launcher.config.schema import MemoryConfig

log = logging.getLogger(__name__)
MAX_ENTRIES = 100_000
"""Allocator events kept (a ring buffer): enough for several steps of a large model."""


class MemoryRecorder:
    """Starts history recording before the model exists; writes snapshots after chosen steps."""

    def __init__(self, cfg: MemoryConfig, run_dir: Path, rank: int, device: torch.device) -> None:
        self.cfg, self.run_dir, self.rank = cfg, run_dir, rank
        self.active = cfg.record_history and device.type == "cuda"
        if cfg.record_history and not self.active:
            log.warning("memory.record_history has no effect on %s: it records the CUDA allocator", device)
        if self.active:
            # Stacks of allocations, not of frees: recording a free's stack makes cuDNN's LSTM fail
            # ("lstm returned NULL without setting an exception", torch 2.11, H100) whenever it frees
            # its workspace; every event is still recorded (bench/probe_history_lstm.py).
            torch.cuda.memory._record_memory_history(context="alloc", stacks="all", max_entries=MAX_ENTRIES)

    def after_step(self, step: int) -> None:
        if self.active and step in self.cfg.snapshot_steps:
            self.dump()

    def dump(self) -> Path | None:
        """Write this rank's snapshot (and its HTML page); None when not recording."""
        if not self.active:
            return None
        path = self.run_dir / f"memory_snapshot_rank{self.rank}.pickle"
        snapshot = torch.cuda.memory._snapshot()
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)
        try:
            from torch.cuda._memory_viz import trace_plot

            path.with_suffix(".html").write_text(trace_plot(snapshot))
        except Exception as err:  # noqa: BLE001 - the pickle is the record; the page is a convenience
            log.warning("could not render %s as HTML: %s", path.name, err)
        log.info("memory snapshot: %s (open it at https://pytorch.org/memory_viz)", path)
        return path

    def close(self) -> None:
        if self.active:
            torch.cuda.memory._record_memory_history(enabled=None)
