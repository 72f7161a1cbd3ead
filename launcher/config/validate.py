"""Value and combination checks on a composed config, run once before any process group exists.

Types and unknown keys are checked earlier, while composing (launcher/config/cli.py); this module checks
ranges and combinations. Each failure is a ConfigError naming the field, the value and a fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from launcher.config.schema import (
    AdamWConfig,
    Backend,
    Config,
    DDPConfig,
    PipelineConfig,
    SGDConfig,
    WandbLoggerConfig,
)
from launcher.errors import ConfigError
from launcher.memory.autobatch import is_auto
from launcher.observe.profile import check_profile
from launcher.parallel import check_parallel
from launcher.parallel.comm_hooks import check_comm_hook
from launcher.recipe import block_layout, recipe_error, resolve_blocks
from launcher.train.fp8 import check_fp8


def check_config(cfg: Config, recipe_class: type, world_size: int) -> None:
    """Raise ConfigError for the first invalid value or combination.

    Args:
        cfg: the composed config.
        recipe_class: the recipe the config selects.
        world_size: the number of processes that will run this config.
    """
    train, optim = cfg.train, cfg.optim
    _at_least("train.steps", train.steps, 1)
    if not is_auto(train.micro_batch_size):  # auto is resolved where the GPU is known (a Slurm node)
        _at_least("train.micro_batch_size", train.micro_batch_size, 1)
    _at_least("train.grad_accum_steps", train.grad_accum_steps, 1)
    if train.global_batch_size is not None:
        _at_least("train.global_batch_size", train.global_batch_size, 1)
    _at_least("train.eval_every", train.eval_every, 0, "0 turns evaluation off")
    _at_least("train.eval_batches", train.eval_batches, 0, "0 evaluates the whole eval split")
    _at_least("train.log_every", train.log_every, 1)
    if train.compile not in ("true", "false"):  # auto and other spellings were resolved while composing
        raise ConfigError("train.compile", train.compile, "must be auto, true or false")
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
    if train.activation_checkpointing is True and block_layout(recipe_class) is None:
        raise ConfigError(
            "train.activation_checkpointing",
            True,
            f"recipe {recipe_class.__name__} declares no blocks (no `layout` attribute)",
            "set train.activation_checkpointing=false, or give the recipe a BlockLayout",
        )
    check_parallel(cfg, recipe_class, world_size)
    check_comm_hook(cfg.comm_hook)
    check_profile(cfg.profile, train.steps)
    _check_resume(cfg.resume)
    _check_run_dir(cfg.run.dir)
    check_run_dir(cfg)
    check_wandb_key(cfg)


def check_warmup(cfg: Config, overridden: bool) -> None:
    """optim.warmup_steps > train.steps: an explicit override is an error; a default one is left to
    the trainer's warning (a short run with the optimizer's default warmup is legitimate)."""
    if overridden and cfg.optim.warmup_steps > cfg.train.steps:
        raise ConfigError(
            "optim.warmup_steps",
            cfg.optim.warmup_steps,
            f"is longer than the run (train.steps={cfg.train.steps}): the learning rate would never peak",
            f"use optim.warmup_steps<={cfg.train.steps}",
        )


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


def recipe_name(recipe_class: type) -> str:
    return f"{recipe_class.__module__}:{recipe_class.__qualname__}"


def check_recipe(cfg: Config, recipe_class: type) -> Any:
    """Instantiate the recipe and build its model on the meta device (nothing allocated), so an error
    in the user's code is reported once, naming the file and line, before any process starts work.
    Returns the recipe instance (the Trainer reuses it)."""
    name = recipe_name(recipe_class)
    try:
        recipe = recipe_class(cfg.recipe)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: any exception is reported the same way
        raise recipe_error(name, "its __init__", err) from None
    try:
        with torch.device("meta"):
            model = recipe.build_model()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001
        raise recipe_error(name, "build_model()", err) from None
    layout = block_layout(recipe_class)
    if layout is not None:
        for part in (layout.pre, layout.blocks, layout.post):
            try:
                model.get_submodule(part)
            except AttributeError:
                raise ConfigError(
                    "recipe",
                    name,
                    f"its layout names {part!r}, which the model built by build_model() does not have",
                    "fix the recipe's `layout = BlockLayout(pre=..., blocks=..., post=...)`",
                ) from None
        try:
            resolve_blocks(model, layout)
        except TypeError as err:
            raise ConfigError("recipe", name, str(err), "layout.blocks must name an nn.ModuleList") from None
    return recipe


def check_train_data(cfg: Config, recipe: Any, recipe_class: type, world_size: int) -> None:
    """The train set gives every data-parallel rank a micro-batch (checked before any process group)."""
    from launcher.parallel.dims import ParallelDims
    from launcher.train.data import check_train_size

    dp = world_size
    if isinstance(cfg.parallel, PipelineConfig):
        dp = ParallelDims.resolve(cfg.parallel.pp, cfg.parallel.dp, world_size).dp
    try:
        dataset = recipe.train_dataset()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001
        raise recipe_error(recipe_name(recipe_class), "train_dataset()", err) from None
    check_train_size(dataset, cfg.train.micro_batch_size, dp, recipe_name(recipe_class))


def check_run_dir(cfg: Config) -> None:
    """run.dir (or run.root) can be created and written: checked before anything starts."""
    field, target = ("run.dir", cfg.run.dir) if cfg.run.dir else ("run.root", cfg.run.root)
    path = Path(target).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    else:
        probe = existing / f".launcher_probe_{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            problem = f"cannot write in {existing} ({err.strerror or err})"
    if problem:
        raise ConfigError(
            field,
            target,
            problem,
            "fix its permissions, or choose a writable location, e.g. run.root=/scratch/runs",
        )


def check_wandb_key(cfg: Config) -> None:
    """wandb online needs an API key: say so before launch, not as a wandb traceback at set-up."""
    logger = cfg.logger
    mode = getattr(logger, "mode", "offline")
    if not isinstance(logger, WandbLoggerConfig) or getattr(mode, "value", mode) != "online":
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise ConfigError(
        "logger.mode",
        "online",
        "no wandb API key found (WANDB_API_KEY is unset and `wandb login` was not run)",
        "run `wandb login` or set WANDB_API_KEY, or use logger.mode=offline",
    )
