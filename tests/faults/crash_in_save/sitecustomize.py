"""Loaded at interpreter start (PYTHONPATH): SIGKILL rank CRASH_RANK while it writes checkpoint step
CRASH_STEP, after its first file is on disk (its first file whose path contains CRASH_PATH, if set:
e.g. `/sharded/` for DCP shards) but before the checkpoint is committed."""

import os
import signal

_fsync = os.fsync


def _fsync_then_maybe_die(fd):
    _fsync(fd)
    path = os.readlink(f"/proc/self/fd/{fd}")
    if (
        os.environ.get("RANK") == os.environ.get("CRASH_RANK")
        and f".tmp_step_{os.environ.get('CRASH_STEP')}/" in path
        and os.environ.get("CRASH_PATH", "") in path
    ):
        os.kill(os.getpid(), signal.SIGKILL)


os.fsync = _fsync_then_maybe_die
