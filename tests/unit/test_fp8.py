"""precision=fp8: refused (exit 2) where fp8 cannot run; the model conversion keeps names and shapes."""

from __future__ import annotations

import pytest
import torch

from launcher.config.schema import Fp8Recipe, Precision, PrecisionConfig
from launcher.train.fp8 import FP8_PAYS_FROM, convert_to_fp8, fp8_narrow_share
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
    converted = convert_to_fp8(GPT(cfg), PrecisionConfig(dtype=Precision.fp8), head="head")

    def kinds(model):
        return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    blocks = {f"blocks.0.{n}": "Float8Linear" for n in ("qkv", "attn_out", "mlp_in", "mlp_out")}
    assert kinds(converted) == {**blocks, "head.proj": "Linear"}  # the output head stays bf16
    with_head = PrecisionConfig(dtype=Precision.fp8, fp8_head=True, fp8_recipe=Fp8Recipe.rowwise)
    rowwise = convert_to_fp8(GPT(cfg), with_head, head="head")
    assert kinds(rowwise) == {**blocks, "head.proj": "Float8Linear"}
    granularity = rowwise.head.proj.config.cast_config_input.scaling_granularity
    assert granularity.value == "axiswise"  # torchao's name for per-row scales
    # Checkpoints stay interchangeable: same parameter names, shapes and (seeded) values.
    a, b = plain.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    odd = GPT(GPTModelConfig(vocab_size=260, seq_len=16, d_model=40, n_layers=1, n_heads=2))
    convert_to_fp8(odd, PrecisionConfig(dtype=Precision.fp8))
    assert not any(type(m).__name__ == "Float8Linear" for m in odd.modules())  # 40, 260 % 16 != 0


def test_fp8_narrow_share_flags_models_too_narrow_to_gain():
    def gpt(d: int) -> torch.nn.Module:
        with torch.device("meta"):
            return GPT(GPTModelConfig(vocab_size=50304, seq_len=16, d_model=d, n_layers=2, n_heads=8))

    assert fp8_narrow_share(gpt(768), skip="head") == 1.0  # GPT-2-small width: every matmul too narrow
    assert fp8_narrow_share(gpt(FP8_PAYS_FROM), skip="head") == 0.0
    # With the head (768 x 50304) in fp8, its FLOPs count as narrow: min(768, 50304) < FP8_PAYS_FROM.
    assert 0.0 < fp8_narrow_share(gpt(768)) == 1.0
