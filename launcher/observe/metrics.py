"""What a training step costs and achieves: metrics.jsonl, FLOPs for MFU, device memory."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from launcher.launch.diskspace import DiskFull, disk_full_message, is_disk_full

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


class MetricsFile:
    """`metrics.jsonl`: one JSON object per line, written by rank 0 only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines past `step`: a resumed run re-trains them, and no step may appear twice."""
        if not self.path.exists():
            return
        kept = [
            line for line in self.path.read_text().splitlines() if line.strip() and _step_of(line) <= step
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in kept))
        except OSError:
            tmp.unlink(missing_ok=True)  # the file itself is untouched
            raise
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one line, whole or not at all: a failed write (a full disk) is cut off again, so
        the file never holds half a line. Raises DiskFull when the disk is full."""
        before = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            os.truncate(self.path, before)
            if is_disk_full(err):
                raise DiskFull(disk_full_message(err, self.path)) from None
            raise


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:
        return 0


def flops_per_micro_batch(
    build_model: Callable[[], nn.Module],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float | None:
    """Forward + backward FLOPs of the whole model for one micro-batch, counted on the meta device
    (no memory, no compute). Activation-checkpointing recompute is not counted, as MFU requires.

    Returns None (and MFU is not logged) if some op cannot run on the meta device.
    """
    try:
        with torch.device("meta"):
            meta_model = build_model()
        counter = FlopCounterMode(display=False)
        with counter:
            loss = loss_fn(meta_model(inputs.to("meta")), targets.to("meta"))
            loss.backward()
        return float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - a FLOP count is a nicety, never a reason to stop
        log.warning("could not count FLOPs on the meta device (%s); MFU will not be logged", err)
        return None


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU, or None where unknown (e.g. CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    log.warning("unknown GPU %r: set metrics.peak_tflops to log MFU", name)
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    gib = 2**30
    return {
        "max_mem_allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3),
        "max_mem_reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 3),
    }
