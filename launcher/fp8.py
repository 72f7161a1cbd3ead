"""precision=fp8: torchao's float8 training (Linear matmuls in fp8, the rest bf16 autocast).

Only GPUs with fp8 tensor cores (compute capability >= 8.9: Ada, Hopper and later) run it; anywhere
else the config is refused before any process starts. torchao is an optional dependency
(`pip install -e '.[fp8]'`), imported only when fp8 is chosen.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from launcher.config import Precision, PrecisionConfig
from launcher.errors import ConfigError

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


def convert_to_fp8(model: nn.Module, cfg: PrecisionConfig) -> nn.Module:
    """Swap eligible nn.Linear layers for torchao's Float8Linear (in place) when precision=fp8.

    Parameter names and shapes are unchanged, so checkpoints load either way.
    """
    if cfg.dtype != Precision.fp8:
        return model
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(model, module_filter_fn=fp8_eligible)
