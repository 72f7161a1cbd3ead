"""Data loading: one global sample order per epoch, sharded over data-parallel ranks, resumable exactly.

Epoch e orders the train set by a permutation seeded with (seed, e). Global micro-batch k is samples
[k*G, (k+1)*G) of that order, G = micro_batch_size x data-parallel ranks; rank r takes the r-th slice
of micro_batch_size. The position saved in a checkpoint is global, (epoch, samples consumed), so a run
resumed on another number of ranks continues at exactly the next unseen sample of the same order: no
sample is skipped or repeated. The same global batch (micro-batch x ranks) then gives the same
optimizer steps as a run that never changed size; a different one continues from the same sample with
its own batch boundaries. An epoch's last G-1 or fewer samples are dropped (as `drop_last`).

Streaming datasets (`IterableDataset`, no length) are read in their own order: every rank iterates the
stream and keeps its slice of each global micro-batch; resuming skips the samples consumed. Samples
may be `(inputs, targets)` pairs or dicts (as Hugging Face `datasets` yield): see `split_batch`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from launcher.config.schema import LoaderConfig
from launcher.errors import ConfigError

Batch = tuple[Any, Any]
TARGET_KEYS = ("labels", "targets", "target", "label")


def is_streaming(dataset: Any) -> bool:
    return isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__")


class GlobalOrderSampler(Sampler[int]):
    """This rank's sample indices for the global micro-batches of one epoch, from sample `start` on."""

    def __init__(self, size: int, micro: int, dp_rank: int, dp_size: int, seed: int) -> None:
        self.size, self.micro, self.dp_rank, self.dp_size, self.seed = size, micro, dp_rank, dp_size, seed
        self.epoch, self.start = 0, 0

    def global_batches(self) -> int:
        """Global micro-batches left in this epoch."""
        return (self.size - self.start) // (self.micro * self.dp_size)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        width = self.micro * self.dp_size
        for k in range(self.global_batches()):
            first = self.start + k * width + self.dp_rank * self.micro
            yield from order[first : first + self.micro].tolist()

    def __len__(self) -> int:
        return self.global_batches() * self.micro


@dataclass
class Position:
    epoch: int = 0
    samples: int = 0
    """Samples of this epoch's global order already consumed, by all data-parallel ranks together."""


class TrainStream:
    """Endless iterator of train batches on `device`, with a global position to save and restore."""

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        cfg: LoaderConfig,
        device: torch.device,
        split: Callable[[Any], Batch] | None = None,
    ) -> None:
        check_train_size(dataset, micro_batch_size, dp_size)
        self.dataset, self.micro_batch_size, self.device, self.seed = dataset, micro_batch_size, device, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.width = micro_batch_size * dp_size
        self.split = split or split_batch
        self.streaming = is_streaming(dataset)
        self.loader_kwargs = _loader_kwargs(cfg, device)
        self.position = Position()
        self._iter: Iterator[Any] | None = None

    def restore(self, position: Position) -> None:
        self.position = Position(position.epoch, position.samples)
        self._iter = None

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        for _ in range(2):  # at most one epoch change per batch
            if self._iter is None:
                self._iter = self._open_epoch()
            batch = next(self._iter, None)
            if batch is not None:
                self.position.samples += self.width
                inputs, targets = self.split(batch)
                return to_device(inputs, self.device), to_device(targets, self.device)
            self.position = Position(self.position.epoch + 1, 0)
            self._iter = None
        raise ConfigError(
            "recipe",
            type(self.dataset).__name__,
            "its train stream yields no samples",
            "check the recipe's data",
        )

    def _open_epoch(self) -> Iterator[Any]:
        # A generator of its own: creating a loader iterator otherwise draws a worker seed from the
        # global RNG, and a resumed run (which creates one mid-epoch) would shift every dropout mask.
        generator = torch.Generator().manual_seed(self.seed + self.position.epoch)
        if self.streaming:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.position.epoch)
            return self._stream_slices()
        sampler = GlobalOrderSampler(
            len(self.dataset), self.micro_batch_size, self.dp_rank, self.dp_size, self.seed
        )
        sampler.epoch, sampler.start = self.position.epoch, self.position.samples
        loader = DataLoader(
            self.dataset,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            drop_last=True,
            generator=generator,
            **self.loader_kwargs,
        )
        return iter(loader)

    def _stream_slices(self) -> Iterator[Any]:
        """This rank's micro-batches of a stream: its slice of each global micro-batch."""
        samples = itertools.islice(iter(self.dataset), self.position.samples, None)
        collate = torch.utils.data.default_collate
        while True:
            chunk = list(itertools.islice(samples, self.width))
            if len(chunk) < self.width:
                return
            mine = chunk[self.dp_rank * self.micro_batch_size : (self.dp_rank + 1) * self.micro_batch_size]
            batch = collate(mine)
            if self.loader_kwargs["pin_memory"]:
                batch = pin(batch)
            yield batch


def check_train_size(dataset: Any, micro_batch_size: int, dp_size: int, recipe: str = "") -> None:
    """The train set must give every rank at least one micro-batch (streams are not checked)."""
    if is_streaming(dataset):
        return
    if len(dataset) == 0:
        raise ConfigError(
            "recipe",
            recipe or type(dataset).__name__,
            "its train dataset is empty",
            "check the recipe's data settings (e.g. recipe.data.path)",
        )
    per_rank = len(dataset) // dp_size
    if per_rank < micro_batch_size:
        raise ConfigError(
            "train.micro_batch_size",
            micro_batch_size,
            f"is larger than each rank's share of the train set ({len(dataset)} samples / "
            f"{dp_size} data-parallel ranks = {per_rank})",
            f"use train.micro_batch_size<={max(per_rank, 1)} or more data",
        )


def split_batch(batch: Any) -> Batch:
    """(inputs, targets) from a collated batch: a pair as is; a dict loses its target key
    (`labels`, `targets`, `target` or `label`) to targets, and keeps the rest as inputs (one key left:
    that tensor). A recipe with other conventions defines `split_batch(batch)` itself."""
    if isinstance(batch, dict):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            raise ValueError(
                f"dict samples need a target key ({', '.join(TARGET_KEYS)}); got {sorted(batch)}. "
                "Define split_batch(batch) -> (inputs, targets) on the recipe"
            )
        inputs = {k: v for k, v in batch.items() if k != key}
        return (next(iter(inputs.values())) if len(inputs) == 1 else inputs), batch[key]
    inputs, targets = batch
    return inputs, targets


def eval_batches(
    dataset: Any,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    max_batches: int,
    cfg: LoaderConfig,
    device: torch.device,
    split: Callable[[Any], Batch] | None = None,
) -> Iterator[Batch]:
    """The same eval batches every time: this rank's shard (every dp_size-th sample), in order.

    Shards differ in size by at most one sample and the last batch may be short; callers weight
    results by batch size.
    """
    split = split or split_batch
    if is_streaming(dataset):
        shard = itertools.islice(iter(dataset), dp_rank, None, dp_size)
        loader: Any = _chunks(shard, micro_batch_size)
    else:
        indices = list(range(dp_rank, len(dataset), dp_size))
        loader = DataLoader(
            torch.utils.data.Subset(dataset, indices),
            batch_size=micro_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(0),
            **_loader_kwargs(cfg, device),
        )
    limit = max_batches if max_batches > 0 else None
    for batch in itertools.islice(loader, limit):
        inputs, targets = split(batch)
        yield to_device(inputs, device), to_device(targets, device)


def _chunks(samples: Iterator[Any], size: int) -> Iterator[Any]:
    while chunk := list(itertools.islice(samples, size)):
        yield torch.utils.data.default_collate(chunk)


def to_device(data: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists and tuples) moved to `device`; other values as they are."""
    if isinstance(data, torch.Tensor):
        # non_blocking pairs with pinned host memory: the copy overlaps the previous step's compute.
        return data.to(device, non_blocking=device.type == "cuda")
    if isinstance(data, dict):
        return {k: to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(v, device) for v in data)
    return data


def pin(data: Any) -> Any:
    if isinstance(data, torch.Tensor):
        return data.pin_memory()
    if isinstance(data, dict):
        return {k: pin(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(pin(v) for v in data)
    return data


def _loader_kwargs(cfg: LoaderConfig, device: torch.device) -> dict:
    kwargs: dict = {"num_workers": cfg.num_workers, "pin_memory": cfg.pin_memory and device.type == "cuda"}
    if cfg.num_workers > 0:
        kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
    return kwargs
