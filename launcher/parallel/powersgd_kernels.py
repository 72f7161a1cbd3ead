"""PowerSGD's three products as Triton kernels: each one pass over the gradient matrices.

With rank r <= 16 the products P = M Q, Q = M^T P and (E, M) = (M - P Q^T, P Q^T) are memory-bound:
their arithmetic is 2r flops per gradient element. cuBLAS runs them as skinny GEMMs at a fraction of
the memory bandwidth (GPT-2-small on an H100: 6.9 ms a step for passes that take ~1 ms at full
bandwidth, bench/RESULTS.md). These kernels stream each (n, m) matrix once per product, the factor
padded to 16 columns in registers, fp32 throughout (`input_precision="ieee"`: no TF32); P's kernel
adds error feedback's error to the matrices as it reads them, and the decompression writes the new
error and the approximation in the same pass: 7 passes over the gradients a step.

Used only on CUDA with Triton importable (`available`); elsewhere the hook keeps torch.bmm.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch: the hook uses torch.bmm
    triton = None

MAX_RANK = 16
"""Factors are padded to this many columns in the kernels (tl.dot needs 16); higher ranks use bmm."""


def available(matrices: torch.Tensor, rank: int) -> bool:
    """These kernels can run on `matrices` (a (b, n, m) fp32 CUDA tensor, rows contiguous) at `rank`."""
    return (
        triton is not None
        and matrices.is_cuda
        and matrices.dtype == torch.float32
        and matrices.stride(2) == 1
        and rank <= MAX_RANK
    )


if triton is not None:

    @triton.jit
    def _m_times_q(
        m_ptr, e_ptr, q_ptr, p_ptr, n, m, r, m_batch, m_row, e_batch, BN: tl.constexpr, BK: tl.constexpr
    ):
        """P[b, rows] = M[b, rows] @ Q[b] for one block of BN rows; with E given, M += E first (stored)."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        b = tl.program_id(1)
        cols_r = tl.arange(0, 16)
        in_rows = rows[:, None] < n
        acc = tl.zeros((BN, 16), dtype=tl.float32)
        for k0 in range(0, m, BK):
            ks = k0 + tl.arange(0, BK)
            inside = in_rows & (ks[None, :] < m)
            at = rows[:, None] * m_row + ks[None, :]
            tile = tl.load(m_ptr + b * m_batch + at, mask=inside, other=0.0)
            if e_ptr is not None:  # this program alone reads and writes these elements
                tile = tile + tl.load(e_ptr + b * e_batch + at, mask=inside, other=0.0)
                tl.store(m_ptr + b * m_batch + at, tile, mask=inside)
            q = tl.load(
                q_ptr + b * m * r + ks[:, None] * r + cols_r[None, :],
                mask=(ks[:, None] < m) & (cols_r[None, :] < r),
                other=0.0,
            )
            acc += tl.dot(tile, q, input_precision="ieee")
        tl.store(
            p_ptr + b * n * r + rows[:, None] * r + cols_r[None, :],
            acc,
            mask=in_rows & (cols_r[None, :] < r),
        )

    @triton.jit
    def _mt_times_p(
        m_ptr, p_ptr, part_ptr, n, m, r, m_batch, m_row, rows_per_split, BN: tl.constexpr, BM: tl.constexpr
    ):
        """partial[s, b, cols] = M[b, rows of split s, cols]^T @ P[b, rows of split s]."""
        cols = tl.program_id(0) * BM + tl.arange(0, BM)
        s = tl.program_id(1)
        b = tl.program_id(2)
        batches = tl.num_programs(2)
        cols_r = tl.arange(0, 16)
        acc = tl.zeros((BM, 16), dtype=tl.float32)
        first = s * rows_per_split
        for n0 in range(first, first + rows_per_split, BN):
            rows = n0 + tl.arange(0, BN)
            in_rows = (rows < n) & (rows < first + rows_per_split)
            tile = tl.load(
                m_ptr + b * m_batch + rows[:, None] * m_row + cols[None, :],
                mask=in_rows[:, None] & (cols[None, :] < m),
                other=0.0,
            )
            p = tl.load(
                p_ptr + b * n * r + rows[:, None] * r + cols_r[None, :],
                mask=in_rows[:, None] & (cols_r[None, :] < r),
                other=0.0,
            )
            acc += tl.dot(tl.trans(tile), p, input_precision="ieee")
        tl.store(
            part_ptr + ((s * batches + b) * m + cols[:, None]) * 16 + cols_r[None, :],
            acc,
            mask=cols[:, None] < m,
        )

    @triton.jit
    def _decompress(
        m_ptr, e_ptr, p_ptr, q_ptr, n, m, r, m_batch, m_row, e_batch, BN: tl.constexpr, BM: tl.constexpr
    ):
        """E = M - P Q^T (when E is given) and M = P Q^T, for one BN x BM tile."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.program_id(1) * BM + tl.arange(0, BM)
        b = tl.program_id(2)
        cols_r = tl.arange(0, 16)
        p = tl.load(
            p_ptr + b * n * r + rows[:, None] * r + cols_r[None, :],
            mask=(rows[:, None] < n) & (cols_r[None, :] < r),
            other=0.0,
        )
        q = tl.load(
            q_ptr + b * m * r + cols[:, None] * r + cols_r[None, :],
            mask=(cols[:, None] < m) & (cols_r[None, :] < r),
            other=0.0,
        )
        approx = tl.dot(p, tl.trans(q), input_precision="ieee")
        inside = (rows[:, None] < n) & (cols[None, :] < m)
        at = rows[:, None] * m_row + cols[None, :]
        if e_ptr is not None:
            grad = tl.load(m_ptr + b * m_batch + at, mask=inside, other=0.0)
            tl.store(e_ptr + b * e_batch + at, grad - approx, mask=inside)
        tl.store(m_ptr + b * m_batch + at, approx, mask=inside)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


TILES = {"p": (16, 64, 4), "q": (32, 64, 4), "decompress": (64, 128, 4)}
"""(rows, columns, warps) of each kernel's program. Few rows for P, so that one matrix spreads over
the GPU's SMs; bench/probe_powersgd_kernels.py times the alternatives."""


def m_times_q(
    matrices: torch.Tensor, q: torch.Tensor, out: torch.Tensor, error: torch.Tensor | None = None
) -> None:
    """out = matrices @ q, for (b, n, m) matrices, (b, m, r) contiguous q and out (b, n, r).

    With `error` (the matrices' shape and row stride), matrices += error first, in the same pass: error
    feedback's add costs no pass of its own (bench/RESULTS.md).
    """
    b, n, m = matrices.shape
    if error is not None:
        assert error.stride(1) == matrices.stride(1) and error.stride(2) == 1
    rows, cols, warps = TILES["p"]
    _m_times_q[(triton.cdiv(n, rows), b)](
        matrices, error, q, out, n, m, q.shape[2], matrices.stride(0), matrices.stride(1),
        error.stride(0) if error is not None else 0, BN=rows, BK=cols, num_warps=warps,
    )  # fmt: skip


def mt_times_p(matrices: torch.Tensor, p: torch.Tensor, out: torch.Tensor) -> None:
    """out = matrices^T @ p, for (b, n, m) matrices, (b, n, r) contiguous p and out (b, m, r).

    The sum over n is split so that about two programs per SM run; the splits' partial sums are added
    in a fixed order (deterministic, unlike atomics).
    """
    b, n, m = matrices.shape
    r = p.shape[2]
    block_rows, cols, warps = TILES["q"]
    col_blocks = triton.cdiv(m, cols)
    splits = max(1, min(triton.cdiv(n, block_rows), 2 * _sm_count(matrices.device) // (col_blocks * b)))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block_rows) * block_rows
    splits = triton.cdiv(n, rows_per_split)
    partial = torch.empty(splits, b, m, 16, dtype=torch.float32, device=matrices.device)
    grid = (col_blocks, splits, b)
    _mt_times_p[grid](
        matrices, p, partial, n, m, r, matrices.stride(0), matrices.stride(1), rows_per_split,
        BN=block_rows, BM=cols, num_warps=warps,
    )  # fmt: skip
    torch.sum(partial[..., :r], dim=0, out=out)


def decompress(matrices: torch.Tensor, p: torch.Tensor, q: torch.Tensor, error: torch.Tensor | None) -> None:
    """error = matrices - p @ q^T (if given), then matrices = p @ q^T, in one pass.

    `error` has the matrices' shape and row stride; p (b, n, r) and q (b, m, r) are contiguous.
    """
    b, n, m = matrices.shape
    if error is not None:
        assert error.stride(1) == matrices.stride(1) and error.stride(2) == 1
    rows, cols, warps = TILES["decompress"]
    grid = (triton.cdiv(n, rows), triton.cdiv(m, cols), b)
    _decompress[grid](
        matrices, error, p, q, n, m, p.shape[2], matrices.stride(0), matrices.stride(1),
        error.stride(0) if error is not None else 0, BN=rows, BM=cols, num_warps=warps,
    )  # fmt: skip
