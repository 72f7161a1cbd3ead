"""Our PowerSGD communication hook: torch's algorithm and state, planned per bucket and launched cheaply.

torch's `powerSGD_hook` costs far more than its arithmetic (GPT-2-small on one H200, one-rank group:
+52% to +91% per step at rank 4): per matrix it runs its own bmm, QR and copies, allocates and clones
buffers each step, and ends every bucket with `torch.cuda.synchronize`. Profiled, the cost is host
time: each small op takes 10-25 us to launch against a few us on the device. This hook computes the
same thing (Vogels et al., 2019; error feedback and warm start as in torch) with the work planned once
per bucket layout:

- matrices of one shape form one batch, a zero-copy strided view of the bucket when they are equally
  spaced in it (else one stacked copy): one bmm per group for P = M Q, Q = M^T P and M = P Q^T;
- the factors of all groups are orthonormalised together (Cholesky QR in float64: a handful of kernels
  per bucket), the error feedback costs one pass (E = M - P Q^T by one baddbmm);
- P and Q of the whole bucket each travel in one flat all-reduce; tensors not worth compressing
  (biases, norms) are gathered into one reused buffer and one flat all-reduce;
- on CUDA the work runs on a stream of its own, and its three arithmetic segments (before the P
  all-reduce, between P and Q, after Q) replay as CUDA graphs once the bucket's tensors stay put
  (launcher/parallel/bucket_graphs.py): +56% -> +11% per step at rank 4 (bench/RESULTS.md).

The state has the fields of torch's `PowerSGDState` that change during training (`iter`,
`error_dict`, `p_memory_dict`, `q_memory_dict`, the counters and `rng`), with P and Q laid out as
torch lays them out, so checkpoints save and resume it exactly as they do torch's.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import launcher.parallel.powersgd_kernels as powersgd_kernels
from launcher.parallel.bucket_graphs import SegmentGraphs

log = logging.getLogger(__name__)

ORTHOGONALIZATIONS = ("auto", "cholesky", "qr", "gram_schmidt")


@dataclass
class _Group:
    """Same-shaped matrices of one bucket, and where their factors live in the flat P and Q buffers."""

    shape: tuple[int, int]
    offsets: list[int]
    rank: int
    p_start: int
    q_start: int
    strided: bool  # equally spaced in the bucket: viewable as one (b, n, m) tensor without a copy

    @property
    def count(self) -> int:
        return len(self.offsets)


@dataclass
class _Plan:
    """How one bucket layout is compressed; derived from the parameter shapes, never saved."""

    groups: list[_Group]
    uncompressed_index: torch.Tensor | None
    p_size: int
    q_size: int
    numel_before: int
    numel_after: int


class BatchedPowerSGDState:
    """Hyperparameters and per-rank state of `powersgd_hook` (one instance per data-parallel rank).

    Args:
        process_group: the data-parallel group (None = WORLD).
        orthogonalization: "auto" = "cholesky" (Cholesky QR in float64 over all factors of a bucket
            at once: `orthonormalize_all_`), "qr" (torch's choice above rank 2: one batched
            `torch.linalg.qr` per shape group) or "gram_schmidt" (torch's choice up to rank 2:
            batched modified Gram-Schmidt, a few small kernels per column, `orthogonalization_epsilon`
            added to the norms).
        fuse_error_add: with the Triton kernels, add the error feedback inside P's kernel (one pass
            over the gradients fewer: bench/RESULTS.md); False adds it in a pass of its own, the same
            bits (the bench's and the GPU test's comparison).
    """

    def __init__(
        self,
        process_group: Any,
        matrix_approximation_rank: int,
        start_powerSGD_iter: int,
        min_compression_rate: float,
        use_error_feedback: bool,
        warm_start: bool,
        orthogonalization_epsilon: float,
        random_seed: int,
        orthogonalization: str = "auto",
        cuda_graphs: bool = True,
        triton_kernels: bool = True,
        fuse_error_add: bool = True,
    ) -> None:
        if orthogonalization not in ORTHOGONALIZATIONS:
            raise ValueError(
                f"orthogonalization must be one of {ORTHOGONALIZATIONS}, not {orthogonalization!r}"
            )
        self.process_group = process_group
        self.matrix_approximation_rank = matrix_approximation_rank
        self.start_powerSGD_iter = start_powerSGD_iter
        self.min_compression_rate = min_compression_rate
        self.use_error_feedback = use_error_feedback
        self.warm_start = warm_start
        self.orthogonalization_epsilon = orthogonalization_epsilon
        self.orthogonalization = orthogonalization
        self.rng = np.random.RandomState(random_seed)
        self.error_dict: dict[int, torch.Tensor] = {}
        self.p_memory_dict: dict[int, torch.Tensor] = {}
        self.q_memory_dict: dict[int, torch.Tensor] = {}
        self.iter = 0
        self.total_numel_before_compression = 0
        self.total_numel_after_compression = 0
        self.next_stats_report = 0
        self._plans: dict[tuple, _Plan] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._uncompressed: dict[int, torch.Tensor] = {}
        self.graphs = SegmentGraphs(enabled=cuda_graphs)
        self.triton_kernels = triton_kernels
        self.fuse_error_add = fuse_error_add

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """The CUDA stream this rank's hook work runs on (one per device, made on first use)."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def uncompressed_buffer(self, index: int, plan: _Plan, buffer: torch.Tensor) -> torch.Tensor:
        """The bucket's gathered uncompressed elements: one buffer reused every step (graphs need it)."""
        held = self._uncompressed.get(index)
        n = plan.uncompressed_index.numel()
        if held is None or held.numel() != n or held.dtype != buffer.dtype or held.device != buffer.device:
            held = self._uncompressed[index] = torch.empty(n, dtype=buffer.dtype, device=buffer.device)
        return held

    def plan(self, index: int, shapes: list[torch.Size], device: torch.device) -> _Plan:
        key = (index, tuple(shapes))
        if key not in self._plans:
            self._plans[key] = _make_plan(
                shapes, self.matrix_approximation_rank, self.min_compression_rate, device
            )
        return self._plans[key]


def _make_plan(shapes: list[torch.Size], rank: int, min_rate: float, device: torch.device) -> _Plan:
    """Group the bucket's matrices by shape (first appearance order, as torch does) and lay out P, Q."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    uncompressed: list[int] = []
    before = after = offset = 0
    for shape in shapes:
        numel = shape.numel()
        n = shape[0] if len(shape) else 1
        m = numel // n if n else 0
        r = min(n, m, rank)
        # torch's _should_compress: worth it only if the factors are min_rate times smaller.
        before += numel
        if (n + m) * r * min_rate < numel:
            by_shape.setdefault((n, m), []).append(offset)
            after += (n + m) * r
        else:
            uncompressed.extend(range(offset, offset + numel))
            after += numel
        offset += numel
    groups, p_size, q_size = [], 0, 0
    for (n, m), offsets in by_shape.items():
        r = min(n, m, rank)
        gaps = {b - a for a, b in zip(offsets, offsets[1:])}
        strided = len(gaps) <= 1 and (not gaps or gaps.pop() >= n * m)
        groups.append(_Group((n, m), offsets, r, p_size, q_size, strided))
        p_size += len(offsets) * n * r
        q_size += len(offsets) * m * r
    index = torch.tensor(uncompressed, dtype=torch.long, device=device) if uncompressed else None
    return _Plan(groups, index, p_size, q_size, before, after)


def _matrices(buffer: torch.Tensor, group: _Group) -> torch.Tensor:
    """The group's matrices as one (b, n, m) tensor: a view of `buffer` when strided, else a copy."""
    n, m = group.shape
    if group.strided:
        step = group.offsets[1] - group.offsets[0] if group.count > 1 else n * m
        return buffer.as_strided(
            (group.count, n, m), (step, m, 1), buffer.storage_offset() + group.offsets[0]
        )
    return torch.stack([buffer[o : o + n * m].view(n, m) for o in group.offsets])


def _scatter(buffer: torch.Tensor, group: _Group, values: torch.Tensor) -> None:
    """Write a non-strided group's (b, n, m) `values` back to its places in `buffer`."""
    n, m = group.shape
    for i, o in enumerate(group.offsets):
        buffer[o : o + n * m].view(n, m).copy_(values[i])


def orthogonalize_(matrices: torch.Tensor, epsilon: float, method: str) -> None:
    """Make the columns of each (n, r) matrix of the (b, n, r) batch orthonormal, in place.

    "qr" and "gram_schmidt" are torch's two methods; "auto" and "cholesky" use `orthonormalize_all_`.
    """
    if method in ("auto", "cholesky"):
        b, n, r = matrices.shape
        flat = matrices.reshape(-1)  # a copy only when `matrices` is not contiguous
        orthonormalize_all_(flat, [(0, b, n, r)])
        if flat.data_ptr() != matrices.data_ptr():
            matrices.copy_(flat.view(b, n, r))
        return
    half = matrices.dtype in (torch.float16, torch.bfloat16)  # no QR kernels in half precision
    if not half and method == "qr":
        q, _ = torch.linalg.qr(matrices)
        matrices.copy_(q)
        return
    r = matrices.shape[2]
    for i in range(r):
        col = matrices[:, :, i : i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True) + epsilon)
        if i + 1 < r:
            rest = matrices[:, :, i + 1 :]
            # Modified Gram-Schmidt: remove this column's component from every later column at once.
            rest.baddbmm_(col, torch.bmm(col.transpose(1, 2), rest), alpha=-1)


CHOLESKY_SHIFT = 1e-15
"""Relative diagonal shift of each Gram matrix: a rank-deficient (or zero) factor still factors;
its null directions come out as (near) zero columns, which P Q^T then ignores."""


def orthonormalize_all_(memory: torch.Tensor, layout: list[tuple[int, int, int, int]]) -> None:
    """Orthonormalise, in place, the columns of every (n, r) matrix that `layout` places in `memory`.

    `layout` lists (start, count, n, r): `count` matrices of n x r at `memory[start:]`; together they
    cover `memory`. Cholesky QR in float64: G = P^T P = L L^T, P <- P L^-T, with one Cholesky and one
    triangular inverse for all matrices of one rank: a few kernels per bucket instead of torch's QR
    per shape group (~270 us of host time each on an H200, most of the stock hook's cost). In float64
    the Gram matrix's squared condition number stays far inside the precision for any factor that
    fp32 can hold. The basis spans the same columns as QR's; it differs by column signs, which cancel
    in P Q^T.
    """
    wide = memory.to(torch.float64)
    out = torch.empty_like(wide)
    by_rank: dict[int, list[tuple[int, int, int, int]]] = {}
    for entry in layout:
        by_rank.setdefault(entry[3], []).append(entry)
    for r, entries in by_rank.items():
        views = [
            (wide[s : s + c * n * r].view(c, n, r), out[s : s + c * n * r].view(c, n, r))
            for s, c, n, _ in entries
        ]
        grams = torch.empty(sum(c for _, c, _, _ in entries), r, r, dtype=wide.dtype, device=wide.device)
        first = 0
        for w, _ in views:
            torch.bmm(w.transpose(1, 2), w, out=grams[first : first + w.shape[0]])
            first += w.shape[0]
        diag = grams.diagonal(dim1=1, dim2=2)
        diag.add_(diag.sum(-1, keepdim=True) * CHOLESKY_SHIFT + torch.finfo(torch.float64).tiny)
        chol, _ = torch.linalg.cholesky_ex(grams)  # _ex: no host sync to check for failure
        eye = torch.eye(r, dtype=wide.dtype, device=wide.device).expand_as(chol)
        inv_t = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(1, 2)  # L^-T
        first = 0
        for w, o in views:
            torch.bmm(w, inv_t[first : first + w.shape[0]], out=o)
            first += w.shape[0]
    memory.copy_(out)


def _random_qs(state: BatchedPowerSGDState, plan: _Plan, q_memory: torch.Tensor) -> None:
    """Fresh random Q factors, drawn as torch's hook draws them: one seed from the state's RNG, then one
    standard-normal (1, m, r) draw per matrix on the CPU, in the order of the groups."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(state.rng.randint(1_000_000_000))
        draws = []
        for group in plan.groups:
            m, r = group.shape[1], group.rank
            draws += [torch.randn(1, m, r, dtype=q_memory.dtype).reshape(-1) for _ in group.offsets]
    if draws:
        q_memory.copy_(torch.cat(draws))


def _factor_views(memory: torch.Tensor, group: _Group, dim: int, start: int) -> torch.Tensor:
    return memory[start : start + group.count * dim * group.rank].view(group.count, dim, group.rank)


def powersgd_hook(state, bucket):  # unannotated: DDP checks annotations and would reject strings
    """DDP communication hook (also run by GradReducer for pipeline stages); returns the averaged bucket.

    `state` is a BatchedPowerSGDState, `bucket` a GradBucket (or GradReducer's Bucket). On CUDA the
    hook's kernels run on a stream of their own, after the gradients are ready, so they overlap the
    rest of backward instead of queueing behind it; the returned future completes after them.
    """
    buffer = bucket.buffer()
    if not buffer.is_cuda:
        return _powersgd(state, bucket, buffer)
    side = state.stream(buffer.device)
    side.wait_stream(torch.cuda.current_stream(buffer.device))
    with torch.cuda.stream(side):
        return _powersgd(state, bucket, buffer)


def _powersgd(state: BatchedPowerSGDState, bucket: Any, buffer: torch.Tensor) -> torch.futures.Future:
    group_pg = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group_pg)
    if state.iter < state.start_powerSGD_iter:
        if bucket.is_last():
            state.iter += 1
        buffer.div_(world)
        work = dist.all_reduce(buffer, group=group_pg, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    index = bucket.index()
    # The parameters' shapes: `bucket.gradients()` would make a view of the buffer per parameter.
    plan = state.plan(index, [p.shape for p in bucket.parameters()], buffer.device)
    state.total_numel_before_compression += plan.numel_before
    state.total_numel_after_compression += plan.numel_after

    error, add_error = None, False
    if state.use_error_feedback:
        error = state.error_dict.get(index)
        add_error = error is not None
        if error is None:
            error = state.error_dict[index] = torch.zeros_like(buffer)
        # The error is added to the input first; after that `error` is free, and decompress writes
        # input - output into it.

    uncompressed = None
    if plan.uncompressed_index is not None:
        uncompressed = state.uncompressed_buffer(index, plan, buffer)

    fresh = not state.warm_start or index not in state.p_memory_dict
    if fresh:
        state.p_memory_dict[index] = torch.empty(plan.p_size, device=buffer.device, dtype=buffer.dtype)
        state.q_memory_dict[index] = torch.empty(plan.q_size, device=buffer.device, dtype=buffer.dtype)
    p_memory, q_memory = state.p_memory_dict[index], state.q_memory_dict[index]
    if fresh:
        _random_qs(state, plan, q_memory)

    # Strided groups are views of the bucket; the others are stacked copies, made after the error is added.
    # Made on first use: a segment replayed as a CUDA graph needs none of them (host time per bucket).
    @functools.cache
    def made() -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
        return (
            [_matrices(buffer, g) if g.strided else None for g in plan.groups],
            [_factor_views(p_memory, g, g.shape[0], g.p_start) for g in plan.groups],
            [_factor_views(q_memory, g, g.shape[1], g.q_start) for g in plan.groups],
        )

    def streamed(matrix: torch.Tensor) -> bool:  # the products as one-pass Triton kernels
        return state.triton_kernels and powersgd_kernels.available(matrix, state.matrix_approximation_rank)

    def compress_p() -> None:  # input (+ error), its uncompressed part gathered; P = M orth(Q)
        matrices, ps, qs = made()
        # Every matrix a view streamed by P's kernel: the kernel adds the error where it reads the input.
        add_in_kernel = (
            add_error
            and state.fuse_error_add
            and all(g.strided and streamed(matrix) for g, matrix in zip(plan.groups, matrices))
        )
        if add_error and not add_in_kernel:
            buffer.add_(error)
        for i, g in enumerate(plan.groups):
            if not g.strided:
                matrices[i] = _matrices(buffer, g)
        if uncompressed is not None:
            torch.index_select(buffer, 0, plan.uncompressed_index, out=uncompressed)
            if add_in_kernel:
                uncompressed.add_(error[plan.uncompressed_index])
            if error is not None:
                error.index_copy_(0, plan.uncompressed_index, uncompressed)  # the input; minus the mean later
        _orthogonalize_factors(state, q_memory, plan, qs, dim=1)
        for g, matrix, p, q in zip(plan.groups, matrices, ps, qs):
            if streamed(matrix):
                powersgd_kernels.m_times_q(matrix, q, p, _matrices(error, g) if add_in_kernel else None)
            else:
                torch.bmm(matrix, q, out=p)

    def compress_q() -> None:  # Q = M^T orth(P), with P summed over ranks
        matrices, ps, qs = made()
        _orthogonalize_factors(state, p_memory, plan, ps, dim=0)
        for matrix, p, q in zip(matrices, ps, qs):
            if streamed(matrix):
                powersgd_kernels.mt_times_p(matrix, p, q)
            else:
                torch.bmm(matrix.transpose(1, 2), p, out=q)

    def decompress() -> None:  # M = P Q^T (Q averaged), the error = input - M, the mean where uncompressed
        matrices, ps, qs = made()
        q_memory.div_(world)
        for g, matrix, p, q in zip(plan.groups, matrices, ps, qs):
            if g.strided and streamed(matrix):  # the error and M = P Q^T in one pass
                powersgd_kernels.decompress(matrix, p, q, _matrices(error, g) if error is not None else None)
                continue
            q_t = q.transpose(1, 2)
            if error is not None:  # one pass over the input
                if g.strided:
                    torch.baddbmm(matrix, p, q_t, alpha=-1, out=_matrices(error, g))
                else:
                    _scatter(error, g, torch.baddbmm(matrix, p, q_t, alpha=-1))
            if g.strided:
                torch.bmm(p, q_t, out=matrix)
            else:
                _scatter(buffer, g, torch.bmm(p, q_t))
        if uncompressed is not None:
            uncompressed.div_(world)
            buffer.index_copy_(0, plan.uncompressed_index, uncompressed)
            if error is not None:  # as torch's hook: input - output for these elements too
                error.index_add_(0, plan.uncompressed_index, uncompressed, alpha=-1)

    cuda = buffer.is_cuda
    # The tensors the segments touch; while they stay put, the segments replay as CUDA graphs.
    key = None
    if not fresh and all(g.strided for g in plan.groups):
        tensors = (buffer, error, uncompressed, p_memory, q_memory)
        key = (world, add_error, *(t.data_ptr() if t is not None else 0 for t in tensors))
    state.graphs.run(("compress_p", index), key, compress_p, cuda)
    uncompressed_work = None
    if uncompressed is not None:
        uncompressed_work = dist.all_reduce(uncompressed, group=group_pg, async_op=True)
    dist.all_reduce(p_memory, group=group_pg, async_op=True).wait()
    state.graphs.run(("compress_q", index), key, compress_q, cuda)
    q_work = dist.all_reduce(q_memory, group=group_pg, async_op=True)

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        if uncompressed_work is not None:
            uncompressed_work.wait()
        if cuda:  # on the hook's stream, where the segments were captured; this stream waits for it
            here, side = torch.cuda.current_stream(buffer.device), state.stream(buffer.device)
            side.wait_stream(here)
            with torch.cuda.stream(side):
                state.graphs.run(("decompress", index), key, decompress, cuda)
            here.wait_stream(side)
        else:
            decompress()
        if not state.warm_start:
            state.p_memory_dict.clear()
            state.q_memory_dict.clear()
        if bucket.is_last():
            state.iter += 1
        return buffer

    return q_work.get_future().then(finish)


def _orthogonalize_factors(
    state: BatchedPowerSGDState, memory: torch.Tensor, plan: _Plan, views: list[torch.Tensor], dim: int
) -> None:
    """Orthonormalise a bucket's P (dim=0: n rows) or Q (dim=1: m rows) factors, all groups at once."""
    if state.orthogonalization in ("auto", "cholesky"):
        start = "p_start" if dim == 0 else "q_start"
        layout = [(getattr(g, start), g.count, g.shape[dim], g.rank) for g in plan.groups]
        if layout:
            orthonormalize_all_(memory, layout)
        return
    for view in views:
        orthogonalize_(view, state.orthogonalization_epsilon, state.orthogonalization)
