"""precision=fp8: torchao's float8 training (Linear matmuls in fp8, the rest bf16 autocast).

Only GPUs with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper and later) run it; anywhere
else the config is refused before any process starts. torchao is an optional dependency
(`pip install -e '.[fp8]'`), imported only when fp8 is chosen.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from launcher.config.schema import Precision, PrecisionConfig
from launcher.errors import ConfigError

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)


def fp8_gpu_visible() -> bool:
    """A GPU with fp8 tensor cores is visible (compute capability >= 8.9)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= MIN_CAPABILITY


def check_fp8(cfg: PrecisionConfig) -> None:
    """Raise ConfigError unless fp8 training can run here (torchao importable, an fp8-capable GPU)."""
    if cfg.dtype != Precision.fp8:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            "precision",
            "fp8",
            "fp8 training needs an NVIDIA GPU with compute capability >= 8.9 (H100/H200, L40, RTX 4090); "
            "no GPU is visible",
            "use precision=bf16",
        )
    capability = torch.cuda.get_device_capability(0)
    if capability < MIN_CAPABILITY:
        raise ConfigError(
            "precision",
            "fp8",
            f"fp8 training needs compute capability >= 8.9; {torch.cuda.get_device_name(0)} has "
            f"{capability[0]}.{capability[1]}",
            "use precision=bf16",
        )
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(
            "precision", "fp8", "needs torchao, which is not installed", "pip install -e '.[fp8]'"
        )


def fp8_eligible(module: nn.Module, name: str) -> bool:
    """fp8 GEMMs need both Linear dimensions divisible by 16; smaller layers stay in bf16."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


FP8_PAYS_FROM = 2048
"""Linear layers narrower than this (the smaller of in and out features) gain little or lose in fp8:
the casts to fp8 and their amax reductions cost about what the faster matmul saves. Measured on one
H200, both compiled (bench/RESULTS.md): d_model 768 0.95x of bf16, 2048 1.10x, 4096 1.23x."""


def fp8_narrow_share(model: nn.Module, skip: str | None = None) -> float:
    """Share of the fp8-converted Linear FLOPs (in x out per token) in layers narrower than FP8_PAYS_FROM."""
    total = narrow = 0
    for name, module in model.named_modules():
        if not fp8_eligible(module, name) or _under(name, skip):
            continue
        flops = module.in_features * module.out_features
        total += flops
        if min(module.in_features, module.out_features) < FP8_PAYS_FROM:
            narrow += flops
    return narrow / total if total else 1.0


def _under(name: str, prefix: str | None) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def convert_to_fp8(model: nn.Module, cfg: PrecisionConfig, head: str | None = None) -> nn.Module:
    """Swap eligible nn.Linear layers for torchao's Float8Linear (in place) when precision=fp8.

    Args:
        head: the module name of the recipe's output head (its layout's `post`); it stays bf16 unless
            precision.fp8_head is set.

    Parameter names and shapes are unchanged, so checkpoints load either way.
    """
    if cfg.dtype != Precision.fp8:
        return model
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    skip = None if cfg.fp8_head else head
    narrow = fp8_narrow_share(model, skip)
    if narrow > 0.5:
        log.warning(
            "precision=fp8: %.0f%% of the fp8 matmul work is in Linear layers narrower than %d, where fp8 "
            "runs slower than bf16 (measured 0.95x at GPT-2-small's 768); precision=bf16 is likely faster",
            100 * narrow,
            FP8_PAYS_FROM,
        )
    return convert_to_float8_training(
        model,
        config=Float8LinearConfig.from_recipe_name(cfg.fp8_recipe.value),
        module_filter_fn=lambda module, name: fp8_eligible(module, name) and not _under(name, skip),
    )
