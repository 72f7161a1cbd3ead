"""How a process ends: its exit codes, and a bounded exit for the ranks of a multi-process job.

A multi-process rank never tears its process group down before it exits. `destroy_process_group`
(and freeing a pending gloo/NCCL work object) can block forever in C++ with the GIL held when a peer
is gone or mid-teardown: seen as a 2-rank run, refused as a config error after its gloo group was up,
hanging in teardown until killed — out of reach of any Python timer. So every exit path of such a rank
reports while the group is still up, flushes, and calls `exit_now`, which skips all teardown.

`start_deadline` is the backstop for whatever could still block on the way out (a log write to a full
pipe, a logger's close): faulthandler's watchdog is a C thread that needs no GIL; at the deadline it
prints every thread's stack (naming where the rank was stuck) and exits with code 1.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
from typing import NoReturn

# The launcher's exit codes (README "Exit codes", docs/reliability.md). 128 + N: stopped by signal N.
OK, FAILURE, CONFIG, NONFINITE, OOM, DISK = 0, 1, 2, 3, 4, 6
MEANING = {
    OK: "done",
    FAILURE: "failed",
    CONFIG: "invalid configuration",
    NONFINITE: "non-finite loss",
    OOM: "out of GPU memory",
    5: "does not fit (launcher.estimate)",
    DISK: "could not write to the run directory (disk full?)",
}

# Set by `python -m launcher.run` for its workers: messages then name it instead of torchrun.
RUN_ENV = "LAUNCHER_RUN"

_deadline_armed = False


def start_deadline(grace_s: float) -> None:
    """From now on this process ends within `grace_s` seconds, whatever blocks and whoever holds the
    GIL. Only the first call counts until `cancel_deadline`."""
    global _deadline_armed
    if not _deadline_armed:
        faulthandler.dump_traceback_later(grace_s, exit=True, file=sys.__stderr__)
        _deadline_armed = True


def cancel_deadline() -> None:
    """The process goes on (the next job of a sweep)."""
    global _deadline_armed
    if _deadline_armed:
        faulthandler.cancel_dump_traceback_later()
        # Set by `python -m launcher.run` for its workers: messages then name it instead of torchrun.


RUN_ENV = "LAUNCHER_RUN"

_deadline_armed = False


def exit_now(code: int) -> NoReturn:
    """Flush and end the process at once: no unwinding, no interpreter finalization, no process-group
    teardown (see the module docstring). Also right after a clean finish: torch's distributed C++ state
    can abort() during finalization ("terminate called without an active exception", about 1 run in 10
    with gloo on torch 2.13), turning a finished job into a failed one."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


def describe(code: int) -> str:
    """What an exit code means, in words."""
    import signal

    if code < 0 or code > 128:
        signum = -code if code < 0 else code - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}" if code < 0 else f"stopped by {name}"
    return MEANING.get(code, "failed")
