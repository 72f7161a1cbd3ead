"""Sharded model and optimizer state with torch.distributed.checkpoint (DCP), for sharded strategies.

Every rank writes the shards it holds into `<checkpoint>/sharded/` (`__<rank>_<k>.distcp` files and a
`.metadata` index); the rest of a checkpoint (per-rank RNG and data position, the scheduler) is as for
DDP, and the commit is the same: the step directory is renamed into place only after every rank has
written (launcher/train/checkpoint.py). Loading reshards: DCP reads, for each parameter shard this rank holds
now, whatever saved pieces overlap it, so a run resumes on another world size or sharding.

Two of DCP's defaults unpickle arbitrary objects (the `.metadata` index, and non-tensor values such as
optimizer hyperparameters); a checkpoint is data, so here the index is read by an unpickler that admits
only DCP's own metadata classes, and values with `torch.load(weights_only=True)`. sha256 of every file
is in meta.json, and each rank verifies its share of the files before any is read.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from launcher.launch.dist import DistSession
from launcher.train.checkpoint_files import CheckpointError, fsync, sha256

SHARDED_DIR = "sharded"
"""The DCP directory inside a checkpoint step directory."""
FORMAT = "dcp"
"""meta.json's `format` for checkpoints whose model and optimizer are in SHARDED_DIR."""

# What a DCP `.metadata` pickle may name: DCP's metadata dataclasses and the plain types they hold.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


class SafeReader(FileSystemReader):
    """DCP's file reader, with the index read by an unpickler that admits only metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's planner, loading non-tensor values with weights_only=True (the default unpickles anything)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # noqa: PLC0415

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def sharded_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and optimizer, keyed by the whole model's parameter names."""
    return {"model": get_model_state_dict(module), "optim": get_optimizer_state_dict(module, optimizer)}


def save_sharded(state: dict[str, Any], directory: Path, session: DistSession) -> dict[str, str]:
    """Collective: write `state` with DCP; returns {relative path: sha256} of this rank's share of files."""
    dcp.save(state, checkpoint_id=directory)
    return _hash_share(directory, session)


def _hash_share(directory: Path, session: DistSession) -> dict[str, str]:
    session.barrier()  # the index is written (by rank 0) once every rank's shards are
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    mine = names[session.rank :: session.world_size]
    if session.is_main:
        fsync(directory)
    return {f"{SHARDED_DIR}/{name}": sha256(directory / name) for name in mine}


_ASYNC_GROUP: list[Any] = []


def start_async_save(state: dict[str, Any], directory: Path, session: DistSession) -> Any:
    """Collective: copy this rank's shards to host memory and write them in a background thread; returns
    the future that finish_async_save waits on. The thread's own collectives (DCP's planning) run on a
    gloo group of their own, created once, so they never interleave with training's."""
    if session.initialized and not _ASYNC_GROUP:
        _ASYNC_GROUP.append(dist.new_group(backend="gloo"))
    group = _ASYNC_GROUP[0] if _ASYNC_GROUP else None
    return dcp.async_save(state, checkpoint_id=directory, process_group=group)


def finish_async_save(future: Any, directory: Path, session: DistSession) -> dict[str, str]:
    """Collective: wait for this rank's background write; {relative path: sha256} of its share of files."""
    future.result()
    return _hash_share(directory, session)


def verify_sharded(checkpoint: Path, meta: dict[str, Any], session: DistSession) -> None:
    """Check this rank's share of the DCP files against meta.json. Raises CheckpointError."""
    names = sorted(name for name in meta["files"] if name.startswith(f"{SHARDED_DIR}/"))
    if not names:
        raise CheckpointError(f"{checkpoint}: no {SHARDED_DIR}/ files recorded in meta.json")
    for name in names[session.rank :: session.world_size]:
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if sha256(path) != meta["files"][name]:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or truncated")


def saved_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Full shapes of the saved model tensors, from the DCP index. Raises CheckpointError."""
    try:
        metadata = SafeReader(checkpoint / SHARDED_DIR).read_metadata()
    except Exception as err:  # noqa: BLE001 - an unreadable index is reported the same way
        raise CheckpointError(
            f"{checkpoint / SHARDED_DIR / '.metadata'}: refused to load "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    return {
        key.removeprefix("model."): tuple(value.size)
        for key, value in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(value, TensorStorageMetadata)
    }


def load_sharded(checkpoint: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load model and optimizer shards (resharded to this run's layout) in place."""
    state = sharded_state(module, optimizer)
    dcp.load(state, storage_reader=SafeReader(checkpoint / SHARDED_DIR), planner=SafePlanner())
    set_model_state_dict(module, state["model"])
    set_optimizer_state_dict(module, optimizer, state["optim"])


def load_full_model(checkpoint: Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The whole model's state dict from a sharded checkpoint, in one process (no process group): for
    launcher.export / serve / generate. Keys, shapes and dtypes are `model`'s (its tensors are not
    changed), or the saved index's without one."""
    reader = SafeReader(checkpoint / SHARDED_DIR)
    if model is not None:
        target = {k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    else:
        index = reader.read_metadata().state_dict_metadata
        target = {
            key.removeprefix("model."): torch.empty(tuple(value.size), dtype=value.properties.dtype)
            for key, value in index.items()
            if key.startswith("model.") and isinstance(value, TensorStorageMetadata)
        }
    state = {"model": target}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=True)
    return state["model"]
