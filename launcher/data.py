"""Data loading: sharded over data-parallel ranks, seeded, and resumable to the exact batch.

The train stream is endless: epoch after epoch of a DistributedSampler (seeded, `set_epoch` per
epoch), each rank taking every dp_size-th sample of the shuffled order. Its position is
(epoch, batches taken in that epoch); a resumed run skips those samples without loading them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from launcher.config import LoaderConfig
from launcher.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start part-way through an epoch."""

    def __init__(self, dataset: Dataset, dp_size: int, dp_rank: int, seed: int) -> None:
        # drop_last: every rank gets the same number of distinct samples, no padding duplicates.
        super().__init__(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0
    """Batches already taken in this epoch."""


class TrainStream:
    """Endless iterator of train batches on `device`, with a position to save and restore."""

    def __init__(
        self,
        dataset: Dataset,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        cfg: LoaderConfig,
        device: torch.device,
    ) -> None:
        if len(dataset) == 0:
            raise ConfigError(
                "recipe",
                type(dataset).__name__,
                "its train dataset is empty",
                "check the recipe's data settings (e.g. recipe.data.path)",
            )
        per_rank = len(dataset) // dp_size
        if per_rank < micro_batch_size:
            raise ConfigError(
                "train.micro_batch_size",
                micro_batch_size,
                f"is larger than this rank's share of the train set ({len(dataset)} samples / "
                f"{dp_size} data-parallel ranks = {per_rank})",
                f"use train.micro_batch_size<={max(per_rank, 1)} or more data",
            )
        self.dataset, self.micro_batch_size, self.device, self.seed = dataset, micro_batch_size, device, seed
        self.sampler = ResumableSampler(dataset, dp_size, dp_rank, seed)
        self.loader_kwargs = _loader_kwargs(cfg, device)
        self.batches_per_epoch = per_rank // micro_batch_size
        self.position = Position()
        self._iter: Iterator[Batch] | None = None

    def restore(self, position: Position) -> None:
        self.position = Position(position.epoch, position.batch)
        self._iter = None

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.position.batch >= self.batches_per_epoch:
            self.position = Position(self.position.epoch + 1, 0)
            self._iter = None
        if self._iter is None:
            self.sampler.set_epoch(self.position.epoch)
            self.sampler.skip = self.position.batch * self.micro_batch_size
            # A generator of its own: creating a loader iterator otherwise draws a worker seed from the
            # global RNG, and a resumed run (which creates one mid-epoch) would shift every dropout mask.
            generator = torch.Generator().manual_seed(self.seed + self.position.epoch)
            loader = DataLoader(
                self.dataset,
                batch_size=self.micro_batch_size,
                sampler=self.sampler,
                drop_last=True,
                generator=generator,
                **self.loader_kwargs,
            )
            self._iter = iter(loader)
        inputs, targets = next(self._iter)
        self.position.batch += 1
        return to_device(inputs, self.device), to_device(targets, self.device)


def eval_batches(
    dataset: Dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    max_batches: int,
    cfg: LoaderConfig,
    device: torch.device,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """The same eval batches every time: this rank's shard (every dp_size-th sample), in order.

    Shards differ in size by at most one sample; callers weight results by batch size. `drop_last`
    drops a final partial batch (pipelines need every batch the same shape).
    """
    indices = list(range(dp_rank, len(dataset), dp_size))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=micro_batch_size,
        shuffle=False,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(0),
        **_loader_kwargs(cfg, device),
    )
    limit = max_batches if max_batches > 0 else None
    for inputs, targets in itertools.islice(loader, limit):
        yield to_device(inputs, device), to_device(targets, device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # non_blocking pairs with pinned host memory: the copy overlaps the previous step's compute.
    return tensor.to(device, non_blocking=device.type == "cuda")


def _loader_kwargs(cfg: LoaderConfig, device: torch.device) -> dict:
    kwargs: dict = {"num_workers": cfg.num_workers, "pin_memory": cfg.pin_memory and device.type == "cuda"}
    if cfg.num_workers > 0:
        kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
    return kwargs
