"""Settings the launcher picks itself when they say `auto`: `train.compile` and `parallel.bucket_cap_mb`
(here).

Resolved once, while the config is composed and checked, so every later check, the run directory's
`config.yaml` and a resumed run all see the concrete value; the choice and its reason are logged.
"""

from __future__ import annotations

import logging

from launcher.config.schema import Config, DDPConfig, PipelineConfig, PowerSGDConfig
from launcher.errors import ConfigError
from launcher.memory.autobatch import is_auto

log = logging.getLogger(__name__)

COMPILE_BREAK_EVEN_STEPS = 1200
"""`train.compile=auto` compiles CUDA runs of at least this many steps. Measured on one H200 (GPT-2-small,
micro-batch 16, bench/RESULTS.md): the first step takes 14 s longer compiled and every later one
12.2 ms shorter (45.7 -> 33.5 ms), so compiling pays after ~1,150 steps."""

BUCKET_CAP_MB = 25.0
"""`parallel.bucket_cap_mb=auto` without PowerSGD: torch's default, small enough to overlap the first
all-reduce with the rest of backward."""
POWERSGD_BUCKET_CAP_MB = 100.0
"""`parallel.bucket_cap_mb=auto` with PowerSGD: each bucket pays a fixed host and orthonormalisation cost
(~0.1 ms of host work, a dozen small dependent kernels), so 4x fewer buckets cost less, and PowerSGD's
compressed all-reduce has less to overlap. Measured on one H100 (GPT-2-small, mb 16, one-rank NCCL group,
bench/RESULTS.md, the torch.bmm products of then): PowerSGD r4 +8.1% of a step with 100 MB buckets,
+10.1% with 25 MB, in one call. To re-measure with today's kernels: part hooks_repeat."""

ON, OFF, AUTO = "true", "false", "auto"
COMPILE_CHOICES = (AUTO, ON, OFF)


def resolve_compile(cfg: Config, cuda: bool) -> str | None:
    """Set cfg.train.compile to "true"/"false" (from auto, or a spelling such as True); return why, for
    the log, when the launcher chose (None when the user did). Leaves unknown values for validation."""
    value = str(cfg.train.compile).strip().lower()
    if value not in COMPILE_CHOICES:
        return None
    if value != AUTO:
        cfg.train.compile = value
        return None
    from launcher.parallel.pipeline import ZERO_BUBBLE  # noqa: PLC0415 - pipeline imports torch.distributed

    parallel = cfg.parallel
    if not cuda:
        cfg.train.compile, why = OFF, "no GPU: compiling for CPU rarely pays"
    elif isinstance(parallel, PipelineConfig) and parallel.schedule.value in ZERO_BUBBLE:
        cfg.train.compile, why = OFF, f"the {parallel.schedule.value} schedule does not support it"
    elif cfg.train.steps < COMPILE_BREAK_EVEN_STEPS:
        cfg.train.compile = OFF
        why = (
            f"{cfg.train.steps} steps are too few to repay compiling (break-even ~{COMPILE_BREAK_EVEN_STEPS})"
        )
    else:
        cfg.train.compile = ON
        why = f"CUDA and {cfg.train.steps} steps (break-even ~{COMPILE_BREAK_EVEN_STEPS})"
    return f"train.compile=auto -> {cfg.train.compile}: {why}"


def resolve_bucket_cap(cfg: Config) -> str | None:
    """Set parallel.bucket_cap_mb from auto (PowerSGD's or torch's size), or a given number to a float;
    return why, for the log, when the launcher chose.

    Raises:
        ConfigError: a value that is neither auto nor a number.
    """
    parallel = cfg.parallel
    if not isinstance(parallel, (DDPConfig, PipelineConfig)):
        return None
    value = parallel.bucket_cap_mb
    if not is_auto(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            field = "parallel.bucket_cap_mb"
            raise ConfigError(field, value, "must be a number > 0 or auto", f"e.g. {field}=25")
        parallel.bucket_cap_mb = float(value)
        return None
    if isinstance(cfg.comm_hook, PowerSGDConfig):
        parallel.bucket_cap_mb, why = POWERSGD_BUCKET_CAP_MB, "PowerSGD orthonormalises once per bucket"
    else:
        parallel.bucket_cap_mb, why = BUCKET_CAP_MB, "torch's default"
    return f"parallel.bucket_cap_mb=auto -> {parallel.bucket_cap_mb:g}: {why}"
