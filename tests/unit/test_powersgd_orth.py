"""Cholesky QR in float64 (launcher/parallel/powersgd.py): orthonormal, QR's span, safe on zeros."""

from __future__ import annotations

import torch

from launcher.parallel.powersgd import orthogonalize_, orthonormalize_all_


def _factors(b: int, n: int, r: int, condition: float, seed: int) -> torch.Tensor:
    """A (b, n, r) batch whose singular values run from 1 down to 1/condition."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(b, n, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(b, r, r, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), r, dtype=torch.float64)
    return (u * s) @ v.transpose(1, 2)


def test_several_shapes_in_one_buffer_come_out_orthonormal_with_qrs_span():
    shapes = [(3, 40, 4), (2, 17, 4), (1, 9, 2)]  # two ranks: two Cholesky batches
    batches = [_factors(b, n, r, 1e3, seed).float() for seed, (b, n, r) in enumerate(shapes)]
    memory = torch.cat([x.reshape(-1) for x in batches])
    layout, start = [], 0
    for b, n, r in shapes:
        layout.append((start, b, n, r))
        start += b * n * r
    orthonormalize_all_(memory, layout)
    for (s, b, n, r), original in zip(layout, batches):
        q = memory[s : s + b * n * r].view(b, n, r).double()
        eye = torch.eye(r, dtype=torch.float64).expand(b, r, r)
        assert (q.transpose(1, 2) @ q - eye).abs().max() < 1e-5
        ref, _ = torch.linalg.qr(original.double())  # same projector onto the columns' span
        assert (q @ q.transpose(1, 2) - ref @ ref.transpose(1, 2)).abs().max() < 1e-5


def test_ill_conditioned_factors_stay_nearly_orthonormal():
    """Cholesky QR loses orthogonality as kappa^2 * eps: in float64 1e-3 at kappa 1e6 (the Gram
    matrix's 1e12), where float32 (eps 1e-7) would fail outright. PowerSGD's P Q^T tolerates it."""
    p = _factors(4, 64, 4, 1e6, 7).float()
    orthogonalize_(p, 0.0, "auto")
    eye = torch.eye(4).expand(4, 4, 4)
    assert (p.transpose(1, 2) @ p - eye).abs().max() < 5e-3
    p = _factors(4, 64, 4, 1e2, 8).float()  # gradient factors are far better conditioned than that
    orthogonalize_(p, 0.0, "auto")
    assert (p.transpose(1, 2) @ p - eye).abs().max() < 1e-6


def test_zero_and_rank_deficient_factors_stay_finite():
    p = torch.zeros(2, 30, 4)
    p[1, :, :2] = torch.randn(30, 2)  # rank 2 of 4
    p[1, :, 2] = p[1, :, 0]
    orthogonalize_(p, 0.0, "cholesky")
    assert torch.isfinite(p).all()
    assert p[0].abs().max() == 0  # nothing to keep: a zero factor stays zero
    kept = p[1, :, :2]
    assert (kept.T @ kept - torch.eye(2)).abs().max() < 1e-4


def test_non_contiguous_batches_are_written_back():
    base = torch.randn(3, 20, 8)
    view = base[:, :, ::2]  # (3, 20, 4), not contiguous
    orthogonalize_(view, 0.0, "auto")
    assert (view.transpose(1, 2) @ view - torch.eye(4)).abs().max() < 1e-5
