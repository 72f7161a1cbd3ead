"""Pre-flight: before the model is built, will this config fit on this rank's GPU?

The estimate (launcher/memory/estimate.py) of the fullest rank is compared with the memory the
caching allocator can still get: free memory on the device (the CUDA context is already out of
it), capped by memory.limit_gib, less 5% headroom for the estimate's own error. If it does not
fit, the fixes are estimated and ranked, and memory.preflight decides: warn (log and go on),
refuse (ConfigError: exit 2 on every rank), off.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from launcher.config.schema import Config, Preflight
from launcher.errors import ConfigError
from launcher.memory.estimate import Estimate, estimate
from launcher.memory.fixes import Fix, rank_fixes
from launcher.memory.parts import GIB, HEADROOM, NCCL_BYTES
from launcher.memory.table import format_fix

log = logging.getLogger(__name__)
PRETEND_FREE_GIB = "LAUNCHER_PREFLIGHT_FREE_GIB"
"""Test hook: run pre-flight as if a GPU with this much free memory were here (CPU tests)."""


@dataclass
class Verdict:
    fits: bool
    needed: int
    """Bytes the allocator must get: the fullest rank's predicted reserved peak (+ NCCL with peers)."""
    available: int
    estimate: Estimate
    fixes: list[Fix]

    def message(self) -> str:
        rank = self.estimate.worst
        lines = [
            f"{rank.ranks} needs about {self.needed / GIB:.2f} GiB at its peak "
            f"({rank.peak_allocated / GIB:.2f} GiB allocated + allocator overhead), "
            f"{self.available / GIB:.2f} GiB is available on the GPU"
        ]
        if self.fixes:
            lines.append("fixes, largest saving first (add to the command line):")
            lines += [format_fix(f) for f in self.fixes]
        return "\n".join(lines)


def check_fits(cfg: Config, recipe_class: type, world_size: int, available: int, name: str) -> Verdict:
    """Estimate `cfg` and compare with `available` bytes; fixes only when it does not fit."""
    est = estimate(cfg, recipe_class, world_size, name, available)

    def needed_of(e: Estimate) -> int:  # the CUDA context is already out of `available`
        return e.worst.peak_reserved + (NCCL_BYTES if world_size > 1 else 0)

    def fits(e: Estimate) -> bool:
        return needed_of(e) <= available * (1 - HEADROOM)

    fixes = (
        [] if fits(est) else rank_fixes(cfg, recipe_class, world_size, est, available, name, fits, needed_of)
    )
    return Verdict(fits(est), needed_of(est), available, est, fixes)


def preflight(cfg: Config, recipe_class: type, session, limit: int | None) -> Verdict | None:
    """Run the check on CUDA (or with the test hook); log, or raise ConfigError under refuse.

    Every rank checks its own device; all ranks learn whether any is short, so all stop together.
    """
    mode = cfg.memory.preflight
    pretend = os.environ.get(PRETEND_FREE_GIB)
    if mode == Preflight.off or (session.device.type != "cuda" and not pretend):
        return None
    if pretend:
        available, name = int(float(pretend) * GIB), f"{pretend} GiB (pretend)"
    else:
        free, _total = torch.cuda.mem_get_info(session.device)
        available, name = (min(free, limit) if limit else free), torch.cuda.get_device_name(session.device)
    try:
        verdict = check_fits(cfg, recipe_class, session.world_size, available, name)
    except Exception as err:  # noqa: BLE001 - an estimate that fails must not stop a run that may fit
        log.warning(
            "memory pre-flight skipped: could not estimate this config (%s: %s)", type(err).__name__, err
        )
        verdict = None
    short = session.any_rank(verdict is not None and not verdict.fits)[0]  # every rank takes part
    if verdict is None:
        return None
    if verdict.fits and not short:
        log.info(
            "memory pre-flight: needs about %.2f GiB of %.2f GiB available",
            verdict.needed / GIB,
            available / GIB,
        )
        return verdict
    if mode == Preflight.refuse:
        problem = verdict.message() if not verdict.fits else "another rank's GPU is too small for its part"
        if session.device.type == "cuda":  # shows the refusal came before any weight was allocated
            allocated = torch.cuda.memory_allocated(session.device) / GIB
            problem += f"\n(allocated on this GPU so far: {allocated:.2f} GiB)"
        raise ConfigError(
            "memory.preflight",
            "refuse",
            "the estimated peak memory does not fit: " + problem,
            "apply a fix above, or memory.preflight=warn to try anyway",
        )
    log.warning("memory pre-flight: this may run out of memory: %s", verdict.message())
    return verdict
