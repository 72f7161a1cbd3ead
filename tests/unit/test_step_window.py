"""step_time_s: wall time per training step since the last log line, with evaluation, checkpoint saves
and profiler work left out wherever they fall in the window (not only right after a log line)."""

from __future__ import annotations

import time

import pytest

from launcher.observe.timing import StepWindow

STEP_S = 0.05


def _train_step(window: StepWindow) -> None:
    time.sleep(STEP_S)
    window.step()


def test_time_left_out_mid_window_is_not_spread_over_the_window():
    # log_every=4 with a checkpoint after the second step: the old rule restarted the clock there and
    # divided the last two steps' time by four, halving step_time_s.
    window = StepWindow()
    _train_step(window)
    _train_step(window)
    with window.excluding():
        time.sleep(0.3)  # a checkpoint save
    _train_step(window)
    _train_step(window)
    assert window.steps == 4
    assert window.seconds_per_step() == pytest.approx(STEP_S, rel=0.3)


def test_restart_begins_a_new_window():
    window = StepWindow()
    with window.excluding():
        time.sleep(0.1)
    _train_step(window)
    window.restart()
    assert (window.steps, window.left_out) == (0, 0.0)
    _train_step(window)
    assert window.seconds_per_step() == pytest.approx(STEP_S, rel=0.3)
