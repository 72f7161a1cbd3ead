"""Out of memory, explained: one message, memory_summary.txt (and a snapshot) in the run dir, exit 4.

Where it happened (rank, phase, step), what the estimate says against the device, the fixes, and
torch's own `memory_summary()`. Nothing is saved or deleted: checkpoints already written stay as
they are, and `resume=auto` continues from the newest once a fix is applied.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import torch

from launcher.memory.parts import GIB

log = logging.getLogger(__name__)
EXIT_OOM = 4


def oom_phase(err: BaseException, where: dict) -> str:
    """The loop's phase, made precise from the traceback: forward, backward or optimizer step."""
    if where.get("phase") != "train step":
        return str(where.get("phase"))
    for frame in traceback.extract_tb(err.__traceback__):
        path = frame.filename.replace("\\", "/")
        if "/torch/optim/" in path:
            return "optimizer step"
        if frame.name == "_engine_run_backward" or (
            frame.name == "backward" and path.endswith("torch/_tensor.py")
        ):
            return "backward"
    return "forward"


def summary_path(run_dir: Path, rank: int) -> Path:
    return run_dir / ("memory_summary.txt" if rank == 0 else f"memory_summary_rank{rank}.txt")


def report_oom(err: BaseException, job, rank: int, world_size: int, where: dict, recorder=None) -> int:
    """Log the explanation, write the files; returns the exit code."""
    run_dir = Path(job.cfg.run.dir)
    phase, step = oom_phase(err, where), where.get("step", 0)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    torch_summary = torch.cuda.memory_summary() if cuda else "(no CUDA device in this process)"
    device_total = (
        torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if cuda else None
    )
    if job.cfg.memory.limit_gib:
        device_total = int(job.cfg.memory.limit_gib * GIB)
    explanation = _explain(job, world_size, device_total)
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    message = (
        f"rank {rank} ran out of GPU memory in the {phase} of step {step}: {first_line}\n{explanation}\n"
        f"details: {summary_path(run_dir, rank)}"
    )
    try:
        snapshot = recorder.dump() if recorder is not None else None
    except Exception as dump_err:  # noqa: BLE001 - the explanation matters more than the snapshot
        snapshot = None
        log.error("could not write the memory snapshot: %s", dump_err)
    if snapshot:
        message += f", {snapshot}"
    log.error("%s", message)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        summary_path(run_dir, rank).write_text(f"{message}\n\n{torch_summary}\n")
    except OSError as write_err:
        log.error("could not write the memory summary: %s", write_err)
    return EXIT_OOM


def _explain(job, world_size: int, device_total: int | None) -> str:
    """The estimate and fixes; never a second failure on top of the first."""
    from launcher.memory.fixes import rank_fixes
    from launcher.memory.table import render

    try:
        from launcher.memory.estimate import estimate

        gpu = job.cfg.estimate.gpu if device_total is None else "this GPU"
        est = estimate(job.cfg, job.recipe_class, world_size, gpu, device_total)
        fixes = rank_fixes(job.cfg, job.recipe_class, world_size, est, est.device_bytes, est.gpu)
        return render(est, fixes)
    except Exception as est_err:  # noqa: BLE001
        return f"(no estimate: {type(est_err).__name__}: {est_err})"
