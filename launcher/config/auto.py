"""Settings the launcher picks itself when they say `auto`: `train.compile` (here).

Resolved once, while the config is composed and checked, so every later check, the run directory's
`config.yaml` and a resumed run all see the concrete value; the choice and its reason are logged.
"""

from __future__ import annotations

import logging

from launcher.config.schema import Config, PipelineConfig

log = logging.getLogger(__name__)

COMPILE_BREAK_EVEN_STEPS = 1200
"""`train.compile=auto` compiles CUDA runs of at least this many steps. Measured on one H200 (GPT-2-small,
micro-batch 16, bench/RESULTS.md): the first step takes 14 s longer compiled and every later one
12.2 ms shorter (45.7 -> 33.5 ms), so compiling pays after ~1,150 steps."""

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
