"""Device time of a callable on the GPU, for the probes: CUDA events around repeated calls."""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_ms(fn: Callable[[], object], reps: int = 30, warmup: int = 3) -> float:
    """Milliseconds of GPU time per call of `fn` (after `warmup` calls: compiles, caches, autotuning)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
