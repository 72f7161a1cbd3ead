"""Evaluation batches in lockstep, for strategies whose forward is a collective (FSDP all-gathers).

Ranks' eval shards differ by at most one sample, so one rank may have a batch more than another; under
DDP that is harmless (the unwrapped module communicates nothing), under FSDP the rank with fewer
batches would leave its peers waiting in an all-gather. Here every rank asks, per batch, whether any
rank still has one (a tiny CPU all-reduce); a rank that has run out repeats a forward on a batch it
already saw (or, with none of its own, on rank 0's first batch) and throws the outputs away, so the
collectives pair up. The caller sees only its real batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from launcher.launch.dist import DistSession

Batch = tuple[Any, Any]


def lockstep(
    batches: Iterable[Batch], session: DistSession, forward: Callable[[Batch], Any]
) -> Iterator[Batch]:
    """Yield this rank's batches; after they run out, call `forward` on a spare until no rank has any."""
    it = iter(batches)
    first = next(it, None)
    spare = first
    if session.any_rank(first is None)[0]:  # some rank has no batch at all: rank 0's first is the spare
        from launcher.train.data import to_device

        shared = session.broadcast_object(_to_cpu(first) if session.is_main else None)
        spare = spare if spare is not None else to_device(shared, session.device)
    batch = first
    while session.any_rank(batch is not None)[0]:
        if batch is not None:
            yield batch
        elif spare is not None:
            forward(spare)
        batch = next(it, None) if batch is not None else None


def _to_cpu(data: Any) -> Any:
    if hasattr(data, "cpu"):
        return data.cpu()
    if isinstance(data, dict):
        return {k: _to_cpu(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_to_cpu(v) for v in data)
    return data
