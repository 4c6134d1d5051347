"""What a checkpoint holds and how its files are named and encoded.

One folder per checkpoint, `step_00000100/` (100 optimizer steps done; training resumes at loop
index 100). Files are torch-serialized dicts of tensors and plain values, loaded with
`torch.load(weights_only=True)`: no arbitrary unpickling, so a bucket is never a code source.

    model.pt           replicated DDP weights, written once by rank 0
    optim.pt           replicated optimizer state (AdamW moments + param groups), rank 0
    meta.pt            step, run id, world size, resolved (redacted) config as JSON text, rank 0
    rank_00003.pt      what only rank 3 has: RNG states (python, numpy, torch) and sampler state
    MANIFEST.json      written last: every file above with its size and sha256

A sharded state (FSDP: DTensors) is written with torch.distributed.checkpoint (DCP) instead of
model.pt and optim.pt, by every rank together, and read back on any world size:

    state.shard_00003.distcp   rank 3's slices of every tensor of model and optimizer (DCP data)
    state.metadata             DCP's index: which slice of which tensor is in which file (rank 0)

DCP's own reader unpickles its index and the non-tensor values; ours reads both through
restricted unpicklers (the index: DCP's metadata classes only; values: weights_only).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpointing.layout import META, MODEL, OPTIM, rank_file
from checkpointing.manifest import REPLICATED_FORMAT, SHARDED_FORMAT

SHARDS = "state"  # capture()'s entry for the sharded state: becomes SHARD_INDEX and shard files
SHARD_INDEX = "state.metadata"
_SHARD = re.compile(r"state\.shard_(\d{5,})\.distcp")
_DCP_DATA = re.compile(r"__(\d+)_0\.distcp")  # DCP's file of rank r, one per rank (single_file_per_rank)
_DCP_INDEX = ".metadata"


def shard_file(rank: int) -> str:
    return f"state.shard_{rank:05d}.distcp"


@dataclass
class ShardedState:
    """A host copy of a state dict holding DTensors; encoded by every rank together (DCP)."""

    state: dict[str, Any]


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU memory: the only part of a save that blocks
    training. Afterwards the training step may change the originals freely."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_host(v) for v in obj)
    return obj


def plain(obj: Any) -> Any:
    """numpy scalars and arrays to Python numbers and tensors: what weights_only can load back."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a weights_only-loadable form (tensors, ints, lists)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(*, step: int, rank: int, world_size: int, run_id: str, model: torch.nn.Module | None,
            optimizer: torch.optim.Optimizer | None, sampler_state: dict, config: dict) -> dict[str, Any]:
    """name -> host copy of what this rank writes. Replicated state only on rank 0; a sharded
    state (see sharded_state) from every rank, as one ShardedState."""
    files: dict[str, Any] = {
        rank_file(rank): {"rank": rank, "world_size": world_size, "step": step, "rng": rng_state(),
                          "sampler": plain(dict(sampler_state))},
    }
    shards = sharded_state(model, optimizer)
    if shards is not None:
        files[SHARDS] = ShardedState(to_host(shards))
    if rank == 0:
        if model is not None and shards is None:
            files[MODEL] = to_host(model.state_dict())
        if optimizer is not None and shards is None:
            files[OPTIM] = to_host(optimizer.state_dict())
        files[META] = {"format": REPLICATED_FORMAT if shards is None else SHARDED_FORMAT, "step": step,
                       "run_id": run_id, "world_size": world_size, "config_json": json.dumps(config)}
    return files


def sharded_state(model, optimizer) -> dict[str, Any] | None:
    """{"model": ..., "optim": ...} when the state holds DTensors, else None (replicated). An
    FSDP module's comes from torch's distributed state-dict API: keyed by parameter name, so it
    loads into any world size, and into a model that is not sharded. Any other object with a
    state_dict() holding DTensors is taken as it is."""
    dtensor = _dtensor_type()
    if model is None or dtensor is None:  # no DTensor without torch.distributed.tensor loaded
        return None
    if isinstance(model, torch.nn.Module):
        if not any(isinstance(p, dtensor) for p in model.parameters()):
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return {"model": get_model_state_dict(model)}
        msd, osd = get_state_dict(model, optimizer)
        return {"model": msd, "optim": osd}
    state = model.state_dict()
    if not _holds(state, dtensor):
        return None
    return {"model": state} if optimizer is None else {"model": state, "optim": optimizer.state_dict()}


def holds_dtensors(obj: Any) -> bool:
    """Whether a state (nested dicts, lists, tuples) holds a DTensor anywhere: a sharded state."""
    dtensor = _dtensor_type()
    return dtensor is not None and _holds(obj, dtensor)


def _dtensor_type():
    if "torch.distributed.tensor" not in sys.modules:
        return None
    return sys.modules["torch.distributed.tensor"].DTensor


def _holds(obj: Any, cls: type) -> bool:
    if isinstance(obj, cls):
        return True
    if isinstance(obj, dict):
        return any(_holds(v, cls) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds(v, cls) for v in obj)
    return False


def encode_sharded(state: dict[str, Any], *, process_group=None) -> dict[str, bytes]:
    """Every rank together (DCP's save is a collective): this rank's slices, and on rank 0 the
    index, as file name -> bytes. DCP writes into a local temp folder, our writer uploads."""
    import torch.distributed.checkpoint as dcp

    tmp = tempfile.mkdtemp(prefix="orchestrator-dcp-")
    try:
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, thread_count=1, sync_files=False)
        with _plain_errors(prefix=True):
            dcp.save(state, storage_writer=writer, process_group=process_group, no_dist=_alone())
        return {_our_name(name): Path(tmp, name).read_bytes() for name in sorted(os.listdir(tmp))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decode_sharded(files: dict[str, bytes], state: dict[str, Any], *, process_group=None) -> list[str]:
    """Every rank together: fill `state` in place from a sharded checkpoint's files (SHARD_INDEX
    and every shard_file). `state` is shaped the way this rank wants it, sharded over any world
    size or whole (DCP re-slices); a key it lacks is not read. Returns the checkpoint's keys
    (DCP's dotted paths) that were not read, sorted."""
    import torch.distributed.checkpoint as dcp

    reader_cls, planner_cls = _safe_reading()
    tmp = tempfile.mkdtemp(prefix="orchestrator-dcp-")
    try:
        for name, data in files.items():
            Path(tmp, _dcp_name(name)).write_bytes(data)
        reader, planner = reader_cls(tmp), planner_cls()
        try:
            with _plain_errors(prefix=False):
                dcp.load(state, storage_reader=reader, planner=planner, process_group=process_group,
                         no_dist=_alone())
            return planner.unread
        except Exception:
            if reader.refused is not None:  # DCP reports a refused index as "metadata is None"
                raise reader.refused from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alone() -> bool:
    """No process group: one process reads or writes every slice itself."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _plain_errors(*, prefix: bool):
    """DCP gathers every rank's failure into a CheckpointException, a BaseException that `except
    Exception` misses: re-raise the first rank's own exception (or a RuntimeError naming it)."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        with warnings.catch_warnings():  # no process group is on purpose here: one process, every slice
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except CheckpointException as e:
        rank, (exc, _) = min(e.failures.items(), key=lambda kv: kv[0])
        if not prefix and isinstance(exc, Exception):
            raise exc from None
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RuntimeError(f"torch.distributed.checkpoint failed on rank {rank}: {type(exc).__name__}: {first}") from None


def _our_name(dcp_name: str) -> str:
    if dcp_name == _DCP_INDEX:
        return SHARD_INDEX
    m = _DCP_DATA.fullmatch(dcp_name)
    if m is None:
        raise ValueError(f"torch.distributed.checkpoint wrote {dcp_name!r}; expected __R_0.distcp or .metadata")
    return shard_file(int(m.group(1)))


def _dcp_name(name: str) -> str:
    if name == SHARD_INDEX:
        return _DCP_INDEX
    m = _SHARD.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not a file of a sharded state")
    return f"__{int(m.group(1))}_0.distcp"


def is_shard_file(name: str) -> bool:
    return name == SHARD_INDEX or _SHARD.fullmatch(name) is not None


def sharded_keys(files: dict[str, bytes]) -> set[str]:
    """Every key (DCP's dotted path) a sharded checkpoint holds, from its index alone: what a
    rank can check before it joins the collective load."""
    return set(_IndexUnpickler(io.BytesIO(files[SHARD_INDEX])).load().state_dict_metadata)


# DCP's index is a pickle of these classes (and torch dtypes); nothing else is let in.
_INDEX_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"), ("torch", "Size"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _INDEX_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


_SAFE: tuple | None = None


def _safe_reading() -> tuple[type, type]:
    """(reader, planner) classes: DCP's file reader and load planner with restricted unpickling.
    Made on first use, so a replicated run never imports DCP."""
    global _SAFE
    if _SAFE is None:
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
        from torch.distributed.checkpoint.metadata import StorageMeta

        class SafeReader(FileSystemReader):
            refused: pickle.UnpicklingError | None = None

            def read_metadata(self, *args: Any, **kwargs: Any):
                if kwargs.get("rank") is not None:  # DCP's fallback to per-rank indexes: we never write any
                    raise FileNotFoundError("a sharded checkpoint has one index, state.metadata")
                try:
                    with open(Path(self.path) / _DCP_INDEX, "rb") as f:
                        metadata = _IndexUnpickler(f).load()
                except pickle.UnpicklingError as e:
                    self.refused = e
                    raise
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                return metadata

        class SafePlanner(DefaultLoadPlanner):
            unread: list[str] = []

            def create_local_plan(self):
                plan = super().create_local_plan()  # self.state_dict is the flattened template now
                self.unread = sorted(set(self.metadata.state_dict_metadata) - set(self.state_dict))
                return plan

            def load_bytes(self, read_item, value: io.BytesIO) -> None:
                torch.load(value, weights_only=True)  # raises on anything but plain values
                value.seek(0)
                super().load_bytes(read_item, value)

        _SAFE = (SafeReader, SafePlanner)
    return _SAFE


def encode(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def decode(data: bytes) -> Any:
    """Never unpickles arbitrary objects: only tensors and plain containers are accepted."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
