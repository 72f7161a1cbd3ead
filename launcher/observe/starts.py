"""`<run dir>/starts.jsonl`: one line per start of training in a run directory (first start, restarts,
Slurm requeues), so that reports can count restarts and add up wall time across them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

STARTS = "starts.jsonl"


def record_start(run_dir: Path, step: int, world_size: int) -> None:
    """Append this start (rank 0 only): when, from which step, how many ranks, which requeue."""
    line = {
        "timestamp": time.time(),
        "step": step,
        "world_size": world_size,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    }
    with open(run_dir / STARTS, "a") as f:
        f.write(json.dumps(line) + "\n")
