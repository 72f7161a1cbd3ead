"""int8 dynamic quantization of Linear layers: what an export applies, and what loading one rebuilds.

Its own module because both sides need it: `launcher/after/export.py` quantizes a trained model, and
`launcher/after/trained.py` gives a freshly built model the same structure before loading an export's
weights.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.config.schema import Quantize


def quantize_backend() -> str:
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return "torch.ao"
    return "torchao"


def prepare_for_weights(model: nn.Module, quantize: str, backend: str = "torchao") -> nn.Module:
    """Give a freshly built model the structure of a `quantize`d export, so its state dict loads."""
    if quantize == Quantize.int8_dynamic.value:
        quantize_int8(model, backend)
    return model


def quantize_int8(model: nn.Module, backend: str) -> None:
    """int8 dynamic quantization of every Linear layer, in place."""
    if backend == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return
    # Fallback: deprecated in torch but still present (2.13); replaces Linear modules in place.
    from torch.ao.quantization import quantize_dynamic

    quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
