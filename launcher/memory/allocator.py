"""The CUDA caching allocator's settings from `memory.*`: expandable segments and a memory cap.

PYTORCH_CUDA_ALLOC_CONF is read when CUDA initialises, so `configure_allocator` runs before the
process group picks a device. A value the user exported is kept: ours is only appended.
"""

from __future__ import annotations

import logging
import os

import torch

from launcher.config.schema import MemoryConfig

log = logging.getLogger(__name__)
ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second is torch >= 2.9's spelling


def merged_alloc_conf(existing: str, expandable: bool) -> str:
    """`existing` with expandable_segments set to `expandable`, unless the user already chose it."""
    entries = [e.strip() for e in existing.split(",") if e.strip()]
    if any(e.split(":", 1)[0].strip() == "expandable_segments" for e in entries):
        return ",".join(entries)
    return ",".join([*entries, f"expandable_segments:{expandable}"])


def configure_allocator(cfg: MemoryConfig) -> None:
    """Set expandable_segments for this process (CUDA only; a no-op on CPU)."""
    if not torch.cuda.is_available():
        return
    name = next((n for n in ENV_NAMES if n in os.environ), ENV_NAMES[0])
    value = merged_alloc_conf(os.environ.get(name, ""), cfg.expandable_segments)
    os.environ[name] = value
    if torch.cuda.is_initialized():  # a later job of a sweep: the allocator already read the variable
        torch.cuda.memory._set_allocator_settings(f"expandable_segments:{cfg.expandable_segments}")
    log.debug("%s=%s", name, value)


def apply_limit(cfg: MemoryConfig, device: torch.device) -> int | None:
    """memory.limit_gib: cap this process's share of the GPU; returns the cap in bytes, or None."""
    if cfg.limit_gib is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    cap = int(cfg.limit_gib * 2**30)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    return min(cap, total)
