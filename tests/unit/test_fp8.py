"""precision=fp8: refused (exit 2) where fp8 cannot run; the model conversion keeps names and shapes."""

from __future__ import annotations

import pytest
import torch

from launcher.config import Precision, PrecisionConfig
from launcher.fp8 import convert_to_fp8
from recipes.gpt import GPT, GPTModelConfig
from tests.conftest import TINY_GPT, launch


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without an fp8 GPU")
def test_fp8_without_an_fp8_gpu_exits_2_naming_the_fix(tmp_path):
    result = launch([*TINY_GPT, "precision=fp8", "train.steps=1"], tmp_path, timeout=60)
    assert result.returncode == 2, result.output[-2000:]
    assert "precision=fp8" in result.output and "compute capability >= 8.9" in result.output
    assert "fix: use precision=bf16" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training began


def test_fp8_conversion_swaps_eligible_linears_only():
    pytest.importorskip("torchao.float8", reason="torchao is the optional fp8 extra")
    cfg = GPTModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=1, n_heads=2)
    torch.manual_seed(0)
    plain = GPT(cfg)
    torch.manual_seed(0)
    converted = convert_to_fp8(GPT(cfg), PrecisionConfig(dtype=Precision.fp8))
    kinds = {
        name: type(m).__name__ for name, m in converted.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert kinds == {
        "blocks.0.qkv": "Float8Linear",
        "blocks.0.attn_out": "Float8Linear",
        "blocks.0.mlp_in": "Float8Linear",
        "blocks.0.mlp_out": "Float8Linear",
        "head.proj": "Float8Linear",
    }
    # Checkpoints stay interchangeable: same parameter names, shapes and (seeded) values.
    a, b = plain.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    odd = GPT(GPTModelConfig(vocab_size=260, seq_len=16, d_model=40, n_layers=1, n_heads=2))
    convert_to_fp8(odd, PrecisionConfig(dtype=Precision.fp8))
    assert not any(type(m).__name__ == "Float8Linear" for m in odd.modules())  # 40, 260 % 16 != 0
