"""Seeing inside steps: named ranges over the loop's phases, torch.profiler windows, NVTX.

The loop and the strategies mark their phases with `phase("forward_backward")` etc. A phase is a
profiler range (`record_function`) while a profiler exists, an NVTX range with `profile.nvtx=true`, and
a timed interval on log steps (launcher/observe/timing.py). With all of that off it is a shared no-op context,
so an unprofiled run pays one function call per phase.

`profile.enabled=true` runs torch.profiler with a wait/warmup/active/repeat schedule counted from this
run's first step; each finished cycle writes, per rank, `<run dir>/profile/rank<r>_step<N>.json`
(Chrome/Perfetto trace; N = its last step) and `key_averages_rank<r>_step<N>.txt` (printed on rank 0).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, record_function, schedule

from launcher.config.schema import ProfileConfig
from launcher.errors import ConfigError

log = logging.getLogger(__name__)

# The loop's phases, in the order a step runs them. grad_reduce: the pipeline's own all-reduce (under
# DDP the reduction overlaps backward and shows as DDP's all_reduce events inside forward_backward);
# log_sync: on log steps, averaging the loss over ranks (where a rank waits for the slowest).
PHASES = ("data", "forward_backward", "grad_reduce", "optimizer", "log_sync", "eval", "checkpoint")
_NULL = nullcontext()


class Phases:
    """Where named ranges go. One per process (`PHASES_SINK`), set up by the trainer."""

    def __init__(self) -> None:
        self.record = False  # a torch.profiler exists: emit record_function ranges
        self.nvtx = False
        self.timer: Any = None  # launcher.observe.timing.StepTimer while it measures a log step

    def __call__(self, name: str) -> AbstractContextManager:
        timer = self.timer if self.timer is not None and self.timer.armed else None
        if not (self.record or self.nvtx or timer):
            return _NULL
        stack = ExitStack()
        if timer:
            stack.enter_context(timer.interval(name))
        if self.record:
            stack.enter_context(record_function(name))
        if self.nvtx:
            stack.enter_context(torch.cuda.nvtx.range(name))
        return stack

    def reset(self) -> None:
        self.record, self.nvtx, self.timer = False, False, None


PHASES_SINK = Phases()


def phase(name: str) -> AbstractContextManager:
    """A named range over one phase of the step: `with phase("optimizer"): ...`."""
    return PHASES_SINK(name)


def window_steps(cfg: ProfileConfig) -> int:
    """Steps the whole profile schedule spans."""
    return (cfg.wait + cfg.warmup + cfg.active) * cfg.repeat


def check_profile(cfg: ProfileConfig, run_steps: int) -> None:
    """Raise ConfigError for a window that cannot fit in `run_steps` (this run's steps)."""
    for name in ("wait", "warmup"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"profile.{name}", getattr(cfg, name), "must be >= 0")
    for name in ("active", "repeat", "row_limit"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"profile.{name}", getattr(cfg, name), "must be >= 1")
    if cfg.enabled and window_steps(cfg) > run_steps:
        raise ConfigError(
            "profile.active",
            cfg.active,
            f"the profile window (wait {cfg.wait} + warmup {cfg.warmup} + active {cfg.active}) x repeat "
            f"{cfg.repeat} = {window_steps(cfg)} steps is longer than the run (train.steps={run_steps})",
            "shorten profile.wait/warmup/active/repeat, or raise train.steps",
        )


def active_steps(cfg: ProfileConfig, first_step: int, last_step: int) -> list[int]:
    """The training steps whose ops a profile of this run records."""
    cycle = cfg.wait + cfg.warmup + cfg.active
    steps = []
    for c in range(cfg.repeat):
        start = first_step + c * cycle + cfg.wait + cfg.warmup
        steps += [s for s in range(start, start + cfg.active) if s <= last_step]
    return steps


class StepProfiler:
    """torch.profiler around the loop; `step()` after every optimizer step, `close()` at the end."""

    def __init__(
        self, cfg: ProfileConfig, run_dir: Path, rank: int, device: torch.device, first_step: int
    ) -> None:
        self.cfg, self.rank, self.device = cfg, rank, device
        self.out_dir = run_dir / "profile"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            # skip_first: the schedule counts from this run's first step (a resumed run's too).
            schedule=schedule(
                skip_first=first_step,
                wait=cfg.wait,
                warmup=cfg.warmup,
                active=cfg.active,
                repeat=cfg.repeat,
            ),
            on_trace_ready=self._write,
            record_shapes=cfg.record_shapes,
            profile_memory=cfg.memory,
            with_stack=cfg.with_stack,
        )
        # Number the profiler's steps like the loop's, so the trace's ProfilerStep#N is training step N.
        self.prof.step_num = first_step
        self.prof.current_action = self.prof.schedule(first_step)
        if hasattr(self.prof, "_prev_schedule_action"):  # torch >= 2.12 keeps the schedule's view too
            self.prof._prev_schedule_action = self.prof.current_action
        self.last_step = first_step - 1
        self.prof.start()
        self.closed = False
        PHASES_SINK.record = True

    def step(self, step: int) -> None:
        """Training step `step` is done (the trace is written when it ends the active steps)."""
        self.last_step = step
        self.prof.step()

    def close(self) -> None:
        """Stop profiling; a window cut short (run stopped early) is still written."""
        if not self.closed:
            self.closed = True
            PHASES_SINK.record = False
            self.prof.stop()

    def _write(self, prof: torch.profiler.profile) -> None:
        last = self.last_step
        trace = self.out_dir / f"rank{self.rank}_step{last}.json"
        prof.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=self.cfg.row_limit)
        (self.out_dir / f"key_averages_rank{self.rank}_step{last}.txt").write_text(table + "\n")
        if self.rank == 0:
            log.info("profile of steps up to %d: %s\ntop ops by %s:\n%s", last, trace, sort_by, table)


def build_profiler(
    cfg: ProfileConfig, run_dir: Path, session: Any, first_step: int, last_step: int, timer: Any = None
) -> StepProfiler | None:
    """Route this run's phases: to `timer` (a launcher.observe.timing.StepTimer) on log steps, to NVTX if
    asked for, and to a profiler if enabled, which is returned (else None).

    Args:
        session: the DistSession (rank, device).
        first_step, last_step: this run's first and last training step.
    """
    PHASES_SINK.reset()
    PHASES_SINK.timer = timer
    device = session.device
    if cfg.nvtx:
        if device.type == "cuda":
            PHASES_SINK.nvtx = True
        else:
            log.warning("profile.nvtx=true has no effect without CUDA")
    if not cfg.enabled:
        return None
    if first_step > last_step:
        return None
    if first_step + window_steps(cfg) - 1 > last_step:
        log.warning(
            "profile: only %d steps left in this run (resumed at step %d); the window of %d steps "
            "is cut short",
            last_step - first_step + 1,
            first_step - 1,
            window_steps(cfg),
        )
    if session.is_main:
        log.info("profiling steps %s into %s", active_steps(cfg, first_step, last_step), run_dir / "profile")
    return StepProfiler(cfg, run_dir, session.rank, device, first_step)
