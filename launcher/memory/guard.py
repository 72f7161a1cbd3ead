"""The loop's one entry into memory handling: cap, pre-flight, snapshots, and the OOM report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from launcher.memory.allocator import apply_limit
from launcher.memory.autobatch import check_same_on_every_rank
from launcher.memory.oom import report_oom
from launcher.memory.preflight import preflight
from launcher.memory.snapshot import MemoryRecorder


class OutOfMemoryReported(RuntimeError):
    """CUDA ran out of memory and the report is written; the CLI exits with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(f"out of GPU memory (exit code {code})")
        self.code = code


@contextmanager
def memory_guard(job, session, run_dir: Path, where: dict) -> Iterator[MemoryRecorder]:
    """Before the model is built: apply memory.limit_gib and run the pre-flight (ConfigError under
    refuse); start recording history if asked. Around training: turn a CUDA OOM into the report."""
    check_same_on_every_rank(job.cfg, session)  # micro_batch_size=auto decides per rank
    limit = apply_limit(job.cfg.memory, session.device)
    preflight(job.cfg, job.recipe_class, session, limit)
    recorder = MemoryRecorder(job.cfg.memory, run_dir, session.rank, session.device)
    try:
        yield recorder
    except torch.cuda.OutOfMemoryError as err:
        code = report_oom(err, job, session.rank, session.world_size, where, recorder)
        raise OutOfMemoryReported(code) from None  # drops the traceback and the tensors it holds
    finally:
        recorder.close()
