"""The train stream shards, shuffles per epoch, and resumes at the exact batch."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from launcher.config import LoaderConfig
from launcher.data import Position, TrainStream, eval_batches

DATA = TensorDataset(torch.arange(40), torch.arange(40))


def stream(dp_rank=0, dp_size=1, batch=4):
    return TrainStream(DATA, batch, dp_rank, dp_size, seed=3, cfg=LoaderConfig(), device=torch.device("cpu"))


def take(s, n):
    return [next(s)[0].tolist() for _ in range(n)]


def test_ranks_split_the_single_process_batch():
    single = take(stream(batch=4), 5)
    rank0, rank1 = take(stream(0, 2, 2), 5), take(stream(1, 2, 2), 5)
    for whole, a, b in zip(single, rank0, rank1, strict=True):
        assert sorted(whole) == sorted(a + b)


def test_epochs_reshuffle_and_cover_everything():
    s = stream(batch=4)
    epoch0, epoch1 = take(s, 10), take(s, 10)
    assert sorted(sum(epoch0, [])) == list(range(40)) == sorted(sum(epoch1, []))
    assert epoch0 != epoch1
    assert s.position == Position(epoch=1, batch=10)


def test_restore_continues_exactly():
    continuous = take(stream(), 17)
    s = stream()
    take(s, 7)
    resumed = stream()
    resumed.restore(s.position)
    assert take(resumed, 10) == continuous[7:]


def test_eval_batches_cover_shards_once():
    seen = []
    for rank in range(3):
        for inputs, _ in eval_batches(DATA, 4, rank, 3, 0, LoaderConfig(), torch.device("cpu")):
            seen += inputs.tolist()
    assert sorted(seen) == list(range(40))
    limited = list(eval_batches(DATA, 4, 0, 1, 2, LoaderConfig(), torch.device("cpu")))
    assert len(limited) == 2
