"""The train stream shards one global order, shuffles per epoch, and resumes at the exact sample,
also on another number of ranks; streams and dict samples work the same way."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset

from launcher.config.schema import LoaderConfig
from launcher.train.data import Position, TrainStream, eval_batches, split_batch

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
    assert s.position == Position(epoch=1, samples=40)


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


def global_batches(dp_size, micro, n, restore=None):
    """The union of every rank's n-th micro-batch, for n micro-steps."""
    streams = [stream(r, dp_size, micro) for r in range(dp_size)]
    for s in streams:
        if restore:
            s.restore(restore)
    per_rank = [take(s, n) for s in streams]
    return [sorted(sum((rank[k] for rank in per_rank), [])) for k in range(n)], streams[0].position


def test_resume_on_another_number_of_ranks_continues_the_same_global_order():
    whole, _ = global_batches(2, 4, 9)  # 2 ranks x 4 = 8 per global micro-batch
    first, position = global_batches(2, 4, 3)
    assert position == Position(epoch=0, samples=24)
    on_four, _ = global_batches(4, 2, 6, restore=position)  # 4 ranks x 2: the same global batch
    assert first + on_four == whole  # epoch 0 has 5 batches of 8; the 6th starts epoch 1, as before


class Stream(IterableDataset):
    def __iter__(self):
        return ({"x": torch.tensor(i), "labels": torch.tensor(-i)} for i in range(20))


def test_streams_of_dict_samples_shard_and_resume():
    device, cfg = torch.device("cpu"), LoaderConfig()
    ranks = [TrainStream(Stream(), 2, r, 2, 0, cfg, device) for r in range(2)]
    inputs, targets = next(ranks[0])
    assert inputs.tolist() == [0, 1] and targets.tolist() == [0, -1]
    assert next(ranks[1])[0].tolist() == [2, 3]  # the second slice of the first global batch of 4
    resumed = TrainStream(Stream(), 2, 0, 2, 0, cfg, device)
    resumed.restore(ranks[1].position)
    assert next(resumed)[0].tolist() == [4, 5]
    batches = [b[0].tolist() for b in eval_batches(Stream(), 3, 1, 2, 0, cfg, device)]
    assert batches == [[1, 3, 5], [7, 9, 11], [13, 15, 17], [19]]


def test_split_batch_names_the_missing_target_key():
    assert split_batch({"a": 1, "b": 2, "target": 3}) == ({"a": 1, "b": 2}, 3)
    with pytest.raises(ValueError, match="target key"):
        split_batch({"a": 1})
