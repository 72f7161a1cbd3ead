"""Value and combination checks on a composed config, run once before any process group exists.

Types and unknown keys are checked earlier, while composing (launcher/cli.py); this module checks
ranges and combinations. Each failure is a ConfigError naming the field, the value and a fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from launcher.config import (
    AdamWConfig,
    Backend,
    Config,
    DDPConfig,
    PipelineConfig,
    SGDConfig,
    WandbLoggerConfig,
)
from launcher.errors import ConfigError
from launcher.fp8 import check_fp8
from launcher.parallel import check_parallel
from launcher.parallel.comm_hooks import check_comm_hook
from launcher.recipe import block_layout


def check_config(cfg: Config, recipe_class: type, world_size: int) -> None:
    """Raise ConfigError for the first invalid value or combination.

    Args:
        cfg: the composed config.
        recipe_class: the recipe the config selects.
        world_size: the number of processes that will run this config.
    """
    train, optim = cfg.train, cfg.optim
    _at_least("train.steps", train.steps, 1)
    _at_least("train.micro_batch_size", train.micro_batch_size, 1)
    _at_least("train.grad_accum_steps", train.grad_accum_steps, 1)
    _at_least("train.eval_every", train.eval_every, 0, "0 turns evaluation off")
    _at_least("train.eval_batches", train.eval_batches, 0, "0 evaluates the whole eval split")
    _at_least("train.log_every", train.log_every, 1)
    if train.stop_at_step is not None and not 1 <= train.stop_at_step <= train.steps:
        raise ConfigError(
            "train.stop_at_step",
            train.stop_at_step,
            f"must be in [1, train.steps={train.steps}]",
            "or leave it unset (null) to train to train.steps",
        )
    _at_least("loader.num_workers", cfg.loader.num_workers, 0)
    _at_least("loader.prefetch_factor", cfg.loader.prefetch_factor, 1)
    _at_least("checkpoint.every", cfg.checkpoint.every, 0, "0 saves only the final checkpoint")
    _at_least("checkpoint.keep", cfg.checkpoint.keep, 1)
    _positive("dist.timeout_s", cfg.dist.timeout_s)
    _positive("dist.shutdown_grace_s", cfg.dist.shutdown_grace_s)
    _positive("optim.lr", optim.lr)
    _at_least("optim.weight_decay", optim.weight_decay, 0.0)
    _at_least("optim.warmup_steps", optim.warmup_steps, 0)
    _at_least("optim.grad_clip", optim.grad_clip, 0.0, "0 turns clipping off")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", optim.min_lr_ratio, "must be in [0, 1]")
    if isinstance(optim, AdamWConfig):
        if len(optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in optim.betas):
            raise ConfigError(
                "optim.betas", optim.betas, "must be two numbers in [0, 1)", "e.g. optim.betas=[0.9,0.95]"
            )
        _positive("optim.eps", optim.eps)
    if isinstance(optim, SGDConfig):
        if not 0.0 <= optim.momentum < 1.0:
            raise ConfigError("optim.momentum", optim.momentum, "must be in [0, 1)")
        if optim.nesterov and optim.momentum == 0:
            raise ConfigError("optim.nesterov", True, "needs optim.momentum > 0", "set optim.momentum=0.9")
    _positive("precision.init_scale", cfg.precision.init_scale)
    _at_least("precision.growth_interval", cfg.precision.growth_interval, 1)
    check_fp8(cfg.precision)
    if cfg.metrics.peak_tflops is not None:
        _positive("metrics.peak_tflops", cfg.metrics.peak_tflops)
    if cfg.dist.backend == Backend.nccl and not torch.cuda.is_available():
        raise ConfigError(
            "dist.backend", "nccl", "needs CUDA, and no GPU is visible", "use dist.backend=auto (gloo on CPU)"
        )
    if isinstance(cfg.logger, WandbLoggerConfig) and not cfg.logger.project:
        raise ConfigError("logger.project", cfg.logger.project, "must not be empty")
    if isinstance(cfg.parallel, (DDPConfig, PipelineConfig)):
        _positive("parallel.bucket_cap_mb", cfg.parallel.bucket_cap_mb)
    if train.activation_checkpointing and block_layout(recipe_class) is None:
        raise ConfigError(
            "train.activation_checkpointing",
            True,
            f"recipe {recipe_class.__name__} declares no blocks (no `layout` attribute)",
            "set train.activation_checkpointing=false, or give the recipe a BlockLayout",
        )
    check_parallel(cfg, recipe_class, world_size)
    check_comm_hook(cfg.comm_hook)
    _check_resume(cfg.resume)
    _check_run_dir(cfg.run.dir)


def _check_resume(resume: str) -> None:
    if resume in ("auto", "never"):
        return
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            "resume",
            resume,
            "is neither auto, never, nor an existing checkpoint directory",
            "use resume=auto, resume=never, or resume=<run dir>/checkpoints/step_<N>",
        )
    if not (path / "meta.json").is_file():
        raise ConfigError(
            "resume",
            resume,
            "is not a complete checkpoint (no meta.json in it)",
            "point it at a checkpoints/step_<N> directory",
        )


def _check_run_dir(run_dir: Any) -> None:
    if run_dir is not None and not str(run_dir).strip():
        raise ConfigError(
            "run.dir", run_dir, "must not be empty", "leave it unset for runs/<recipe>/<run id>"
        )


def _at_least(field: str, value: float, minimum: float, note: str = "") -> None:
    if value < minimum:
        raise ConfigError(field, value, f"must be >= {minimum}" + (f" ({note})" if note else ""))


def _positive(field: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(field, value, "must be > 0")
