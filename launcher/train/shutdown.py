"""Stopping on a signal without losing a step, and without hanging.

SIGTERM (torchrun forwards it; `scontrol requeue` and preemption send it), SIGINT (Ctrl-C) and SIGUSR1
(Slurm's `--signal` warning) only set a flag here: the training loop checks it at every step boundary,
all ranks agree (a rank may see the signal a step later), and they checkpoint and exit together.
Nothing is saved inside the handler. A rank that cannot reach a step boundary — stuck in a collective
with a dead peer, say — is ended by a watchdog after `grace_s`, so the job never outlives its signal
by more than that. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequested(Exception):
    """Raised by the loop after the checkpoint that a signal asked for; exit code 128 + signum."""

    def __init__(self, signum: int, step: int, saved: bool = True) -> None:
        self.signum, self.step = signum, step
        what = "checkpoint saved" if saved else "before the first step, nothing new to save"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {what}")


class StopFlag:
    """Installs the handlers in the main thread; `signum` is the first signal received, else None."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
            return
        self.signum = signum
        # Python runs handlers between bytecodes of the main thread, so this only records the request.
        timer = threading.Timer(self.grace_s, self._force_exit, args=(signum,))
        timer.daemon = True
        timer.start()

    def _force_exit(self, signum: int) -> None:
        print(
            f"launcher: rank {os.environ.get('RANK', 0)} did not reach a step boundary within "
            f"{self.grace_s:g} s of {signal.Signals(signum).name} (dist.shutdown_grace_s); exiting now",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
