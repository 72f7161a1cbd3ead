"""PowerSGD's Triton products (launcher/parallel/powersgd_kernels.py) against torch.bmm, on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from launcher.parallel import powersgd_kernels as kernels
from launcher.parallel.powersgd import BatchedPowerSGDState, powersgd_hook

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or kernels.triton is None, reason="needs CUDA and Triton"
    ),
]


def strided_matrices(b: int, n: int, m: int, gap: int) -> torch.Tensor:
    """b matrices of n x m, equally spaced in one flat buffer with `gap` elements between them."""
    step = n * m + gap
    flat = torch.randn(b * step + 5, device="cuda")
    return flat.as_strided((b, n, m), (step, m, 1), 5)


@pytest.mark.parametrize(
    ("b", "n", "m", "r"), [(1, 2304, 768, 4), (3, 768, 3072, 1), (2, 50304, 96, 16), (1, 77, 131, 8)]
)
def test_products_equal_bmm(b, n, m, r):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    matrices = strided_matrices(b, n, m, gap=7)
    q = torch.randn(b, m, r, device="cuda")
    p = torch.empty(b, n, r, device="cuda")
    kernels.m_times_q(matrices, q, p)
    torch.testing.assert_close(p, torch.bmm(matrices, q), rtol=1e-5, atol=1e-4)
    q_out = torch.empty(b, m, r, device="cuda")
    kernels.mt_times_p(matrices, p, q_out)
    torch.testing.assert_close(q_out, torch.bmm(matrices.transpose(1, 2), p), rtol=1e-4, atol=1e-2)
    approx = torch.bmm(p, q_out.transpose(1, 2))
    error_expected = matrices - approx
    error = torch.zeros_like(matrices)
    kernels.decompress(matrices, p, q_out, error)
    torch.testing.assert_close(error, error_expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(matrices, approx, rtol=1e-5, atol=1e-3)


def test_product_with_the_error_added_in_its_pass():
    """m_times_q with an error: the matrices become matrices + error, and P is their product with Q."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    matrices, error = strided_matrices(3, 768, 3072, gap=7), strided_matrices(3, 768, 3072, gap=7)
    expected = matrices + error
    q, p = torch.randn(3, 3072, 4, device="cuda"), torch.empty(3, 768, 4, device="cuda")
    kernels.m_times_q(matrices, q, p, error)
    torch.testing.assert_close(matrices, expected, rtol=0, atol=0)
    torch.testing.assert_close(p, torch.bmm(expected, q), rtol=1e-5, atol=1e-4)


class Bucket:
    """What powersgd_hook reads of DDP's GradBucket."""

    def __init__(self, buffer: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        self._buffer, self._params = buffer, [torch.empty(s, device="meta") for s in shapes]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return 0

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return True


def test_hook_with_kernels_equals_hook_with_bmm_under_cuda_graphs():
    """Eight steps (six compressed, later ones replayed as CUDA graphs): the averaged gradients and the
    error feedback of the kernel path equal the bmm path's to fp32 rounding, and adding the error inside
    P's kernel gives the bits that a pass of its own gives."""
    torch.backends.cuda.matmul.allow_tf32 = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    shapes = [(768, 2304), (768,), (768, 768), (3072, 768), (768, 3072)]
    numel = sum(torch.Size(s).numel() for s in shapes)
    options = {
        "kernels": dict(triton_kernels=True),
        "add_apart": dict(triton_kernels=True, fuse_error_add=False),
        "bmm": dict(triton_kernels=False),
    }
    states = {k: BatchedPowerSGDState(None, 4, 2, 2.0, True, True, 0.0, 0, **o) for k, o in options.items()}
    buffers = {k: torch.empty(numel, device="cuda") for k in states}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(8):
        grad = torch.randn(numel, device="cuda", generator=gen)
        out = {}
        for k, state in states.items():
            buffers[k].copy_(grad)
            out[k] = powersgd_hook(state, Bucket(buffers[k], shapes)).wait().clone()
        torch.testing.assert_close(out["kernels"], out["bmm"], rtol=1e-3, atol=1e-3)
        assert torch.equal(out["kernels"], out["add_apart"])
    errors = {k: state.error_dict[0] for k, state in states.items()}
    torch.testing.assert_close(errors["kernels"], errors["bmm"], rtol=1e-3, atol=1e-3)
    assert torch.equal(errors["kernels"], errors["add_apart"])
    assert states["kernels"].graphs._graphs, "the kernel path was never captured as CUDA graphs"
