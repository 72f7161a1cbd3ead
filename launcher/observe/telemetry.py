"""GPU telemetry from NVML (the `nvidia-ml-py` package), sampled on log steps, every rank's in one list.

Each logged train line gets `gpus`: one entry per rank with `util_pct` (GPU busy time over NVML's last
sample period), `mem_used_gib` (device memory in use as the driver sees it: every process, the CUDA
context and the caching allocator's reserve), `power_w`, `temp_c` and `max_mem_allocated_gib` (torch's
peak). Without a GPU, with metrics.gpu_telemetry=false, or without NVML there is nothing, never an
error: a value NVML cannot give is null.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from launcher.launch.dist import DistSession

log = logging.getLogger(__name__)

KEYS = ("util_pct", "mem_used_gib", "power_w", "temp_c", "max_mem_allocated_gib")
GIB = 2**30


def _nvml_handle(device: torch.device) -> Any:
    """NVML's handle for this torch device (matched by UUID: CUDA_VISIBLE_DEVICES renumbers), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:  # noqa: BLE001 - older drivers or torch: fall back to the index
            return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception as err:  # noqa: BLE001 - telemetry is optional, never a reason to stop
        log.warning("no GPU telemetry: NVML unavailable (%s)", err)
        return None


class GpuTelemetry:
    """Samples this rank's GPU on log steps; `sample()` is a collective (every rank calls it)."""

    def __init__(self, enabled: bool, session: DistSession) -> None:
        self.session = session
        self.active = enabled and session.device.type == "cuda"
        self.handle = _nvml_handle(session.device) if self.active else None

    def _read(self) -> list[float]:
        values = [math.nan] * len(KEYS)
        if self.handle is not None:
            import pynvml

            readers = (
                lambda h: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used / GIB,
                lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # milliwatts
                lambda h: float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
            )
            for i, read in enumerate(readers):
                try:
                    values[i] = read(self.handle)
                except Exception:  # noqa: BLE001 - e.g. power readings not supported on this board
                    pass
        values[-1] = torch.cuda.max_memory_allocated(self.session.device) / GIB
        return values

    def sample(self) -> dict[str, Any]:
        """{"gpus": [per-rank dict, ...]} on CUDA (one small all-reduce on the CPU side group); {}
        otherwise."""
        if not self.active:
            return {}
        table = torch.zeros(self.session.world_size, len(KEYS), dtype=torch.float64)
        table[self.session.rank] = torch.tensor(self._read(), dtype=torch.float64)
        self.session.all_reduce(table, "sum", group=self.session.control_group)
        rows = table.tolist()
        return {
            "gpus": [
                {"rank": r, **{k: (None if math.isnan(v) else round(v, 3)) for k, v in zip(KEYS, row)}}
                for r, row in enumerate(rows)
            ]
        }
