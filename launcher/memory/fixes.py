"""What to change when a config does not fit: candidate overrides, each re-estimated, ranked.

Every fix is an exact override to type, checked by the same validation a run gets, and its saving
is a new estimate, not a rule of thumb. When no single change fits, the best ones are combined.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from launcher.config.schema import Config, DDPConfig, FSDPConfig, NoCommHookConfig, PipelineConfig, Precision
from launcher.errors import ConfigError
from launcher.memory.estimate import Estimate, estimate
from launcher.recipe import block_layout

Change = tuple[list[str], Callable[[Config], None]]
MAX_COMBINED = 4


@dataclass
class Fix:
    overrides: list[str]
    device_needed: int
    saving: int
    fits: bool

    @property
    def command(self) -> str:
        return " ".join(self.overrides)


def candidate_changes(cfg: Config, recipe_class: type, world_size: int) -> list[Change]:
    """Changes that keep the global batch and the model: checkpointing, smaller micro-batches with
    more accumulation, bf16, more pipeline stages, sharding (FSDP). Only those that pass validation."""
    train, changes = cfg.train, []
    if not train.activation_checkpointing and block_layout(recipe_class) is not None:
        changes.append(
            (["train.activation_checkpointing=true"], _set("train", "activation_checkpointing", True))
        )
    mb, accum = train.micro_batch_size, train.grad_accum_steps
    if mb >= 2 and mb % 2 == 0:

        def halve(c: Config) -> None:
            c.train.micro_batch_size, c.train.grad_accum_steps = mb // 2, accum * 2

        changes.append(([f"train.micro_batch_size={mb // 2}", f"train.grad_accum_steps={accum * 2}"], halve))
    if cfg.precision.dtype == Precision.fp32:
        changes.append((["precision=bf16"], _set("precision", "dtype", Precision.bf16)))
    if isinstance(cfg.parallel, PipelineConfig) and world_size % (cfg.parallel.pp * 2) == 0:
        changes.append(([f"parallel.pp={cfg.parallel.pp * 2}"], _set("parallel", "pp", cfg.parallel.pp * 2)))
    elif isinstance(cfg.parallel, DDPConfig) and world_size >= 2 and world_size % 2 == 0:

        def to_pipeline(c: Config) -> None:
            c.parallel = PipelineConfig(pp=2, bucket_cap_mb=cfg.parallel.bucket_cap_mb)

        def to_fsdp(c: Config) -> None:
            c.parallel = FSDPConfig()
            c.comm_hook = NoCommHookConfig()

        changes.append((["parallel=pipeline", "parallel.pp=2"], to_pipeline))
        changes.append((["parallel=fsdp", "comm_hook=none"], to_fsdp))
    elif isinstance(cfg.parallel, FSDPConfig) and not cfg.parallel.reshard_after_forward:
        changes.append(
            (["parallel.reshard_after_forward=true"], _set("parallel", "reshard_after_forward", True))
        )
    return [change for change in changes if _valid(cfg, change, recipe_class, world_size)]


def rank_fixes(
    cfg: Config,
    recipe_class: type,
    world_size: int,
    base: Estimate,
    device_total: int,
    gpu: str,
    fits: Callable[[Estimate], bool] | None = None,
    needed: Callable[[Estimate], int] | None = None,
) -> list[Fix]:
    """Each single change's estimate, largest saving first; plus a combination when none fits alone.

    `fits` decides for an estimate and `needed` measures it (defaults: its device_needed, within the
    device less HEADROOM); pre-flight passes its own, the CUDA context being out of its free memory.
    """
    fits = fits or (lambda est: est.fits)
    needed = needed or (lambda est: est.worst.device_needed)

    def try_change(c: Config, overrides: list[str]) -> Fix:
        est = estimate(c, recipe_class, world_size, gpu, device_total)
        return Fix(overrides, needed(est), needed(base) - needed(est), fits(est))

    fixes = []
    for overrides, apply in candidate_changes(cfg, recipe_class, world_size):
        changed = copy.deepcopy(cfg)
        apply(changed)
        fixes.append(try_change(changed, overrides))
    fixes.sort(key=lambda f: -f.saving)
    if fixes and not any(f.fits for f in fixes):
        combined = _combine(cfg, recipe_class, world_size, try_change)
        if combined is not None:
            fixes.insert(0, combined)
    return [f for f in fixes if f.saving > 0]


def _combine(cfg: Config, recipe_class: type, world_size: int, try_change) -> Fix | None:
    """Greedy: apply the change that saves most, re-derive the candidates, repeat until it fits."""
    current, overrides, best = copy.deepcopy(cfg), [], None
    for _ in range(MAX_COMBINED):
        options = []
        for more, apply in candidate_changes(current, recipe_class, world_size):
            changed = copy.deepcopy(current)
            apply(changed)
            options.append((try_change(changed, _merge(overrides, more)), changed))
        if not options:
            break
        best, current = max(options, key=lambda o: o[0].saving)
        overrides = best.overrides
        if best.fits:
            return best
    return best


def _merge(old: list[str], new: list[str]) -> list[str]:
    """Later values of the same key replace earlier ones: micro-batch halved twice is one override."""
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in old if o.split("=", 1)[0] not in keys] + new


def _set(section: str, key: str, value: object) -> Callable[[Config], None]:
    def apply(c: Config) -> None:
        setattr(getattr(c, section), key, value)

    return apply


def _valid(cfg: Config, change: Change, recipe_class: type, world_size: int) -> bool:
    from launcher.config.validate import check_config

    changed = copy.deepcopy(cfg)
    change[1](changed)
    try:
        check_config(changed, recipe_class, world_size)
    except ConfigError:
        return False
    return True
