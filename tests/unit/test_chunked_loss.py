"""Chunked cross-entropy equals the plain one: values and gradients, in fp32 and from bf16 logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recipes.chunked_loss import chunked_cross_entropy


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_chunked_cross_entropy_matches_plain_loss_and_gradient(dtype, tol):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 37, 300, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (3, 37), generator=g)
    plain = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    (plain_grad,) = torch.autograd.grad(plain, logits)
    for chunk in (16, 50, 111):  # uneven last chunk, several sizes, and one chunk = all tokens
        chunked = chunked_cross_entropy(logits, targets, chunk)
        (grad,) = torch.autograd.grad(chunked, logits)
        assert grad.dtype == dtype and grad.shape == logits.shape
        assert abs(chunked.item() - plain.item()) <= tol * abs(plain.item())
        assert torch.allclose(
            grad.float(),
            plain_grad.float(),
            rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
            atol=1e-8 if dtype == torch.float32 else 1e-5,
        )


def test_chunked_backward_never_holds_fp32_logits():
    """Saved for backward: the bf16 logits only, never an fp32 (B*T, V) tensor."""
    logits = torch.randn(4, 64, 512).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 512, (4, 64))
    fp32_saved = []

    def pack(t):
        if t.dtype == torch.float32 and t.numel() >= 4 * 64 * 512 // 2:
            fp32_saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(logits, targets, 32).backward()
    assert fp32_saved == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
    assert fp32_saved  # the check can fail: the plain loss does keep fp32 logits
