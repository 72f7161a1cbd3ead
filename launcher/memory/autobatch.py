"""`train.micro_batch_size=auto` and `train.activation_checkpointing=auto`: the fastest fitting choice.

Before the model is built, each candidate (micro-batch, checkpointing) is estimated by the same trace
as pre-flight, and judged by the same rule: the fullest rank's reserved peak must fit the device with
HEADROOM to spare. Among those that fit, the launcher takes the one with the best expected throughput:

    samples/s  ~  mb / (mb * (F + C) + OVERHEAD)

per micro-step, with F the training FLOPs of one sample, C the forward FLOPs of the checkpointed blocks
that backward recomputes (0 without checkpointing), and OVERHEAD what a micro-step costs besides its
arithmetic (kernel launches, the optimizer step shared out), as FLOPs. The global batch is kept:
`train.global_batch_size` if set (accumulation = global / (mb x data-parallel ranks)), otherwise the
accumulation as given, and the global batch follows from the pick. The resolved values are what the
rest of the launcher, config.yaml and a resumed run see.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from launcher.config.schema import Config, PipelineConfig
from launcher.errors import ConfigError
from launcher.memory.parts import CUDA_CONTEXT_BYTES, GIB, HEADROOM, NCCL_BYTES
from launcher.recipe import block_layout

log = logging.getLogger(__name__)
AUTO = "auto"
MAX_MICRO_BATCH = 4096
"""Largest micro-batch tried when the global batch does not bound it."""
OVERHEAD_FLOPS = 2.4e12
"""A micro-step's fixed cost in FLOPs of arithmetic it is worth. Measured on one H200 (bench/RESULTS.md,
GPT-2-small compiled, ~1 GFLOP per token): micro-batch 32 ran 6.8% more tokens/s than 16, as a fixed
cost of ~2,400 tokens' work per micro-step predicts (bench_speed.py --suite microbatch recalibrates)."""
PRETEND_DEVICE_GIB = "LAUNCHER_AUTO_DEVICE_GIB"
"""Test hook: size `auto` for a device of this many GiB (CPU tests)."""


@dataclass
class Candidate:
    micro_batch_size: int
    grad_accum_steps: int
    activation_checkpointing: bool
    needed: int
    """Bytes the allocator must get at the fullest rank's peak (as pre-flight counts them)."""
    fits: bool
    score: float = 0.0
    """Expected samples per second, up to a constant factor."""

    def line(self) -> str:
        ac = ", checkpointing" if self.activation_checkpointing else ""
        return f"mb {self.micro_batch_size} x {self.grad_accum_steps}{ac}: {self.needed / GIB:.2f} GiB"


def is_auto(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def needs_resolving(cfg: Config) -> bool:
    return is_auto(cfg.train.micro_batch_size) or is_auto(cfg.train.activation_checkpointing)


def normalize(cfg: Config) -> None:
    """Turn non-auto values into int / bool (the schema types them Any to admit `auto`).

    Raises:
        ConfigError: a value that is neither auto nor of the right type.
    """
    train = cfg.train
    if not is_auto(train.micro_batch_size):
        if isinstance(train.micro_batch_size, bool) or not isinstance(train.micro_batch_size, int):
            raise ConfigError(
                "train.micro_batch_size", train.micro_batch_size, "must be an integer >= 1 or auto"
            )
    if not is_auto(train.activation_checkpointing):
        value = str(train.activation_checkpointing).strip().lower()
        if value not in ("true", "false"):
            raise ConfigError(
                "train.activation_checkpointing",
                train.activation_checkpointing,
                "must be true, false or auto",
            )
        train.activation_checkpointing = value == "true"
    else:
        train.activation_checkpointing = AUTO
    if is_auto(train.micro_batch_size):
        train.micro_batch_size = AUTO


def device_bytes_here(cfg: Config) -> tuple[int, str] | None:
    """What `auto` sizes for on this machine: this rank's GPU (total less the CUDA context), capped by
    memory.limit_gib; None without a GPU (and without the test hook)."""
    pretend = os.environ.get(PRETEND_DEVICE_GIB)
    limit = int(cfg.memory.limit_gib * GIB) if cfg.memory.limit_gib else None
    if pretend:
        total, name = int(float(pretend) * GIB), f"{pretend} GiB (pretend)"
    elif torch.cuda.is_available():
        from launcher.memory.allocator import configure_allocator  # noqa: PLC0415

        configure_allocator(cfg.memory)  # before CUDA initialises: the allocator reads it once
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        total, name = props.total_memory - CUDA_CONTEXT_BYTES, props.name
    else:
        return None
    return (min(total, limit), name) if limit else (total, name)


def resolve_batch(
    cfg: Config,
    recipe_class: type,
    world_size: int,
    size_for: Callable[[Config], tuple[int, str] | None] | None,
) -> str | None:
    """Resolve `auto` in cfg.train in place; return what was chosen and why (None: nothing was auto).

    Args:
        size_for: gives (bytes the allocator may use, name) to size for, asked only when something is
            auto; None, or None from it: no device known.

    Raises:
        ConfigError: no device to size for, a global batch that does not divide, or nothing fits.
    """
    normalize(cfg)
    train = cfg.train
    if train.global_batch_size is not None and not is_auto(train.micro_batch_size):
        _derive_accumulation(cfg, _data_parallel_size(cfg, world_size))
    if not needs_resolving(cfg):
        return None
    kept = _keep_previous_pick(cfg)
    if kept:
        return kept
    device = size_for(cfg) if size_for is not None else None
    if device is None:
        raise ConfigError(
            "train.micro_batch_size" if is_auto(train.micro_batch_size) else "train.activation_checkpointing",
            AUTO,
            "sizes the run to a GPU's memory, and there is no GPU here",
            "set memory.limit_gib to the GPU memory to plan for, or give a number / true / false",
        )
    available, name = device
    started = time.perf_counter()
    dp = _data_parallel_size(cfg, world_size)
    sizes, accum_of = _micro_batch_options(cfg, dp)
    checkpointing = _checkpointing_options(cfg, recipe_class)
    flops = _flops_per_sample(cfg, recipe_class)
    tried: list[Candidate] = []
    best: Candidate | None = None
    for ac in checkpointing:
        fitting = _largest_fitting(cfg, recipe_class, world_size, available, sizes, accum_of, ac, tried)
        if fitting is None:
            continue
        train_flops, recompute_flops = flops
        mb = fitting.micro_batch_size
        fitting.score = mb / (mb * (train_flops + (recompute_flops if ac else 0.0)) + OVERHEAD_FLOPS)
        if best is None or fitting.score > best.score:
            best = fitting
    what = "train.micro_batch_size" if is_auto(train.micro_batch_size) else "train.activation_checkpointing"
    if best is None:
        smallest = min(tried, key=lambda c: c.needed)
        raise ConfigError(
            what,
            AUTO,
            f"nothing fits {available / GIB:.1f} GiB ({name}) with {HEADROOM:.0%} headroom; the smallest "
            f"choice tried ({smallest.line()}) needs more",
            "see `python -m launcher.estimate` with the same overrides for its fixes "
            "(bf16, more pipeline stages, a smaller model)",
        )
    global_batch = best.micro_batch_size * best.grad_accum_steps * dp
    train.micro_batch_size = best.micro_batch_size
    train.grad_accum_steps = best.grad_accum_steps
    train.activation_checkpointing = best.activation_checkpointing
    fitting_lines = "; ".join(
        c.line() for c in sorted(tried, key=lambda c: (c.activation_checkpointing, c.micro_batch_size))
    )
    ac = str(best.activation_checkpointing).lower()
    return (
        f"{what}=auto -> micro_batch_size={best.micro_batch_size}, grad_accum_steps={best.grad_accum_steps}, "
        f"activation_checkpointing={ac} (global batch {global_batch}): "
        f"the fastest expected of the choices that fit {available / GIB:.1f} GiB ({name}) with "
        f"{HEADROOM:.0%} headroom; estimated [{fitting_lines}] in {time.perf_counter() - started:.0f} s"
    )


def _keep_previous_pick(cfg: Config) -> str | None:
    """A run that resumes keeps what auto picked when it started (its run directory's config.yaml),
    whatever GPU it resumes on: the same global batch, the same micro-steps."""
    if cfg.resume == "never":
        return None
    if cfg.resume not in ("auto", ""):
        config = Path(cfg.resume).parent.parent / "config.yaml"  # resume=<run dir>/checkpoints/step_N
    elif cfg.run.dir:
        config = Path(cfg.run.dir) / "config.yaml"
    else:
        return None
    try:
        saved = (yaml.safe_load(config.read_text()) or {}).get("train", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    mb, accum, ac = (
        saved.get(k) for k in ("micro_batch_size", "grad_accum_steps", "activation_checkpointing")
    )
    if not (isinstance(mb, int) and isinstance(accum, int) and isinstance(ac, bool)):
        return None
    train = cfg.train
    if is_auto(train.micro_batch_size):
        train.micro_batch_size, train.grad_accum_steps = mb, accum
    if is_auto(train.activation_checkpointing):
        train.activation_checkpointing = ac
    return (
        f"auto -> micro_batch_size={train.micro_batch_size}, grad_accum_steps={train.grad_accum_steps}, "
        f"activation_checkpointing={str(train.activation_checkpointing).lower()}: kept from {config} "
        "(a resumed run keeps what auto picked)"
    )


def check_same_on_every_rank(cfg: Config, session) -> None:  # noqa: ANN001
    """Every rank must train with the same micro-batch and accumulation: auto decides per rank, from
    its own GPU, so GPUs of different sizes could disagree. Raises ConfigError if they do."""
    train = cfg.train
    mine = (train.micro_batch_size, train.grad_accum_steps, bool(train.activation_checkpointing))
    picks = session.all_gather_object(mine)
    if any(p != mine for p in picks):
        raise ConfigError(
            "train.micro_batch_size",
            AUTO,
            f"ranks picked different (micro-batch, accumulation, checkpointing): {sorted(set(picks))}; "
            "their GPUs differ in memory",
            "give train.micro_batch_size (and train.activation_checkpointing) explicitly",
        )


def _derive_accumulation(cfg: Config, dp: int) -> None:
    """train.global_batch_size with a given micro-batch: the accumulation that makes it up."""
    train = cfg.train
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            train.global_batch_size,
            f"is not a multiple of train.micro_batch_size x data-parallel ranks = {per_step}",
            f"try train.global_batch_size={max(per_step, train.global_batch_size // per_step * per_step)}",
        )
    train.grad_accum_steps = train.global_batch_size // per_step


def _data_parallel_size(cfg: Config, world_size: int) -> int:
    if isinstance(cfg.parallel, PipelineConfig):
        from launcher.parallel.dims import ParallelDims  # noqa: PLC0415

        return ParallelDims.resolve(cfg.parallel.pp, cfg.parallel.dp, world_size).dp
    return world_size


def _micro_batch_options(cfg: Config, dp: int) -> tuple[list[int], Callable[[int], int]]:
    """Micro-batch sizes to consider (ascending) and the accumulation each would need."""
    train = cfg.train
    step = cfg.parallel.num_microbatches if isinstance(cfg.parallel, PipelineConfig) else 1
    if not is_auto(train.micro_batch_size):
        mb = train.micro_batch_size
        return [mb], lambda _mb: train.grad_accum_steps
    if train.global_batch_size is not None:
        if train.global_batch_size % dp:
            raise ConfigError(
                "train.global_batch_size",
                train.global_batch_size,
                f"must be a multiple of the {dp} data-parallel ranks",
                f"try train.global_batch_size={max(dp, train.global_batch_size // dp * dp)}",
            )
        per_rank = train.global_batch_size // dp
        sizes = [m for m in range(step, per_rank + 1, step) if per_rank % m == 0]
        if not sizes:
            raise ConfigError(
                "train.global_batch_size",
                train.global_batch_size,
                f"leaves {per_rank} samples per rank, not a multiple of parallel.num_microbatches={step}",
                "choose a global batch that is",
            )
        return sizes, lambda mb: per_rank // mb
    sizes = [step * 2**k for k in range(13) if step * 2**k <= MAX_MICRO_BATCH]
    return sizes, lambda _mb: train.grad_accum_steps


def _checkpointing_options(cfg: Config, recipe_class: type) -> list[bool]:
    value = cfg.train.activation_checkpointing
    if not is_auto(value):
        return [bool(value)]
    return [False, True] if block_layout(recipe_class) is not None else [False]


def _largest_fitting(
    cfg, recipe_class, world_size, available, sizes, accum_of, ac, tried
) -> Candidate | None:
    """Binary search over `sizes` (peak memory grows with the micro-batch): the largest that fits."""
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = _estimate(cfg, recipe_class, world_size, available, sizes[mid], accum_of(sizes[mid]), ac)
        tried.append(candidate)
        if candidate.fits:
            best, lo = candidate, mid + 1
        else:
            hi = mid - 1
    return best


def _estimate(cfg, recipe_class, world_size, available, mb, accum, ac) -> Candidate:
    from launcher.memory.estimate import estimate  # noqa: PLC0415 - heavy; only when something is auto

    trial = copy.deepcopy(cfg)
    trial.train.micro_batch_size, trial.train.grad_accum_steps = mb, accum
    trial.train.activation_checkpointing = ac
    est = estimate(trial, recipe_class, world_size, "auto", available)
    needed = est.worst.peak_reserved + (NCCL_BYTES if world_size > 1 else 0)
    return Candidate(mb, accum, ac, needed, needed <= available * (1 - HEADROOM))


def _flops_per_sample(cfg: Config, recipe_class: type) -> tuple[float, float]:
    """(forward + backward FLOPs of one sample, forward FLOPs of its blocks), on the meta device.
    (1.0, 0.0) when the model cannot run there: then larger micro-batches always win."""
    from launcher.recipe import resolve_blocks  # noqa: PLC0415

    recipe = recipe_class(cfg.recipe)
    try:
        sample = recipe.train_dataset()[0]
        with torch.device("meta"):
            model = recipe.build_model()
        inputs, targets = (t.unsqueeze(0).to("meta") for t in sample[:2])
        layout = block_layout(recipe)
        blocks = resolve_blocks(model, layout) if layout is not None else []
        forward = FlopCounterMode(display=False)
        with forward:
            out = model(inputs)
        block_names = {n for n, m in model.named_modules() if any(m is b for b in blocks)}
        counts = forward.get_flop_counts()
        block_flops = sum(sum(counts[n].values()) for n in block_names if n in counts)
        total = FlopCounterMode(display=False)
        with total:
            recipe.loss(model(inputs), targets).backward()
        del out
        return float(total.get_total_flops()), float(block_flops)
    except Exception as err:  # noqa: BLE001 - the choice then rests on memory alone
        log.warning(
            "auto: could not count FLOPs on the meta device (%s); preferring larger micro-batches", err
        )
        return 1.0, 0.0
