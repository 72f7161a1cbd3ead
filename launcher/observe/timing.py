"""How long a step takes (StepWindow) and where its time goes, measured on log steps only:
time_data_s, time_forward_backward_s, time_optimizer_s, time_log_sync_s (averaging the loss over
ranks for the log line: where a rank waits for the slowest) and, with data-parallel peers, time_comm_s.

On CUDA the intervals are CUDA events on the compute stream, read when the log step synchronises
anyway (for its loss): no host sync is added, and other steps record nothing. On CPU they are
perf_counter readings. The four phases tile the step, so they add up to its time (but for the loop's
bookkeeping between them); time_comm_s is
the communication the backward pass did not hide (part of time_forward_backward_s): from the moment
the last gradient was accumulated to the end of forward_backward, i.e. DDP waiting for its final
buckets' all-reduce, or the pipeline's gradient all-reduce after the schedule.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

FIELDS = {
    "data": "time_data_s",
    "forward_backward": "time_forward_backward_s",
    "optimizer": "time_optimizer_s",
    "log_sync": "time_log_sync_s",
}


class StepWindow:
    """Wall time per training step since the last log line: `step_time_s` and the throughput.

    What is not training (evaluation, checkpoint saves, the profiler stepping and writing its trace)
    is left out with `excluding()`, wherever it falls: restarting the clock instead would divide the
    time of the steps after it by every step of the window.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.left_out = time.perf_counter(), 0, 0.0

    def step(self) -> None:
        self.steps += 1

    @contextmanager
    def excluding(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.left_out += time.perf_counter() - began

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.start - self.left_out) / self.steps


class _Clock:
    """A point in time: a CUDA event on the current stream, or perf_counter on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.event = torch.cuda.Event(enable_timing=True) if cuda else None
        self.t = 0.0
        self.marked = False

    def mark(self) -> None:
        self.marked = True
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def seconds_until(self, later: _Clock) -> float:
        if self.event is not None:
            later.event.synchronize()
            return self.event.elapsed_time(later.event) / 1000.0
        return later.t - self.t


class StepTimer:
    """Arm it at the start of a log step; phases report intervals; `collect()` returns the fields.

    Args:
        enabled: metrics.step_timing.
        device: this rank's device.
        comm_params: parameters whose gradient accumulation ends the backward compute, when the step
            communicates gradients (data-parallel peers); None otherwise.
    """

    def __init__(self, enabled: bool, device: torch.device, comm_params: Iterable[torch.Tensor] | None):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.comm_params = [p for p in comm_params if p.requires_grad] if comm_params is not None else None
        self.armed = False
        self.intervals: dict[str, list[tuple[_Clock, _Clock]]] = {}
        self.hooks: list[Any] = []
        self.last_grad: _Clock | None = None

    def begin(self, log_step: bool) -> None:
        """A step starts; measure it if it is a log step."""
        self.armed = self.enabled and log_step
        if not self.armed:
            return
        self.intervals = {}
        if self.comm_params is not None:
            self.last_grad = _Clock(self.cuda)
            # Hooks only for this step: other steps run without them. Each gradient re-marks the clock,
            # so after backward it holds the moment the last one was accumulated.
            self.hooks = [
                p.register_post_accumulate_grad_hook(lambda _p: self.last_grad.mark())
                for p in self.comm_params
            ]

    @contextmanager
    def interval(self, name: str) -> Iterator[None]:
        start, end = _Clock(self.cuda), _Clock(self.cuda)
        start.mark()
        try:
            yield
        finally:
            end.mark()
            self.intervals.setdefault(name, []).append((start, end))

    def collect(self) -> dict[str, float]:
        """The measured fields of the step just finished (empty if it was not measured)."""
        if not self.armed:
            return {}
        self.armed = False
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        out = {}
        for name, field in FIELDS.items():
            spans = self.intervals.get(name)
            if spans:
                out[field] = sum(start.seconds_until(end) for start, end in spans)
        spans = self.intervals.get("forward_backward")
        if self.last_grad is not None and self.last_grad.marked and spans:
            out["time_comm_s"] = max(0.0, self.last_grad.seconds_until(spans[-1][1]))
        self.last_grad = None
        return out
