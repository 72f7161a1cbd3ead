"""Our PowerSGD communication hook: torch's algorithm and state, with batched work per bucket.

torch's `powerSGD_hook` costs far more than its arithmetic (GPT-2-small on one H100, one-rank group:
+64% per step at rank 4): per matrix it runs its own bmm, QR and copies, allocates and clones buffers
each step, and ends every bucket with `torch.cuda.synchronize`, which stalls the host and so the
backward pass behind it. This hook computes the same thing (Vogels et al., 2019; error feedback and
warm start as in torch) with the work planned once per bucket layout:

- matrices of one shape form one batch, a zero-copy strided view of the bucket when they are equally
  spaced in it (else one stacked copy): one bmm per group for P = M Q, Q = M^T P and M = P Q^T,
  and one batched orthogonalisation per group;
- P and Q of the whole bucket each travel in one flat all-reduce; tensors not worth compressing
  (biases, norms) are gathered by one index into one flat all-reduce;
- the error-feedback buffer is reused in place, nothing waits on the host.

The state has the fields of torch's `PowerSGDState` that change during training (`iter`,
`error_dict`, `p_memory_dict`, `q_memory_dict`, the counters and `rng`), with P and Q laid out as
torch lays them out, so checkpoints save and resume it exactly as they do torch's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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
        orthogonalization: "auto" (torch's rule: QR for rank > 2 in fp32, else Gram-Schmidt),
            "qr" (one batched `torch.linalg.qr` per group: orthonormal even for ill-conditioned or
            rank-deficient factors) or "gram_schmidt" (batched modified Gram-Schmidt: a few small
            kernels per column; loses orthogonality as the factors' condition number grows).
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
    ) -> None:
        if orthogonalization not in ("auto", "gram_schmidt", "qr"):
            raise ValueError(f"orthogonalization must be auto, gram_schmidt or qr, not {orthogonalization!r}")
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


def orthogonalize_(matrices: torch.Tensor, epsilon: float, method: str) -> None:
    """Make the columns of each (n, r) matrix of the (b, n, r) batch orthonormal, in place."""
    half = matrices.dtype in (torch.float16, torch.bfloat16)  # no QR kernels in half precision
    if not half and (method == "qr" or (method == "auto" and matrices.shape[2] > 2)):
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

    `state` is a BatchedPowerSGDState, `bucket` a GradBucket (or GradReducer's Bucket).
    """
    group_pg = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group_pg)
    buffer = bucket.buffer()
    if state.iter < state.start_powerSGD_iter:
        if bucket.is_last():
            state.iter += 1
        buffer.div_(world)
        work = dist.all_reduce(buffer, group=group_pg, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    index = bucket.index()
    plan = state.plan(index, [g.shape for g in bucket.gradients()], buffer.device)
    state.total_numel_before_compression += plan.numel_before
    state.total_numel_after_compression += plan.numel_after

    error = None
    if state.use_error_feedback:
        error = state.error_dict.get(index)
        if error is None:
            error = state.error_dict[index] = torch.zeros_like(buffer)
        else:
            buffer.add_(error)
        error.copy_(buffer)  # the input; becomes input - output at the end

    uncompressed = uncompressed_work = None
    if plan.uncompressed_index is not None:
        uncompressed = buffer.index_select(0, plan.uncompressed_index)
        uncompressed_work = dist.all_reduce(uncompressed, group=group_pg, async_op=True)

    fresh = not state.warm_start or index not in state.p_memory_dict
    if fresh:
        state.p_memory_dict[index] = torch.empty(plan.p_size, device=buffer.device, dtype=buffer.dtype)
        state.q_memory_dict[index] = torch.empty(plan.q_size, device=buffer.device, dtype=buffer.dtype)
    p_memory, q_memory = state.p_memory_dict[index], state.q_memory_dict[index]
    if fresh:
        _random_qs(state, plan, q_memory)

    eps, method = state.orthogonalization_epsilon, state.orthogonalization
    matrices = [_matrices(buffer, g) for g in plan.groups]
    ps = [_factor_views(p_memory, g, g.shape[0], g.p_start) for g in plan.groups]
    qs = [_factor_views(q_memory, g, g.shape[1], g.q_start) for g in plan.groups]
    for matrix, p, q in zip(matrices, ps, qs):
        orthogonalize_(q, eps, method)
        torch.bmm(matrix, q, out=p)
    dist.all_reduce(p_memory, group=group_pg, async_op=True).wait()
    for matrix, p, q in zip(matrices, ps, qs):
        orthogonalize_(p, eps, method)
        torch.bmm(matrix.transpose(1, 2), p, out=q)
    q_work = dist.all_reduce(q_memory, group=group_pg, async_op=True)

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        q_memory.div_(world)
        for g, matrix, p, q in zip(plan.groups, matrices, ps, qs):
            approx = torch.bmm(p, q.transpose(1, 2))
            if g.strided:
                matrix.copy_(approx)
            else:
                n, m = g.shape
                for i, o in enumerate(g.offsets):
                    buffer[o : o + n * m].view(n, m).copy_(approx[i])
        if uncompressed_work is not None:
            uncompressed_work.wait()
            buffer.index_copy_(0, plan.uncompressed_index, uncompressed.div_(world))
        if error is not None:
            error.sub_(buffer)
        if not state.warm_start:
            state.p_memory_dict.clear()
            state.q_memory_dict.clear()
        if bucket.is_last():
            state.iter += 1
        return buffer

    return q_work.get_future().then(decompress)
