"""Find, verify and load checkpoints. Only committed ones (with a manifest) count; every file read
is checked against the manifest; a corrupt checkpoint is reported and the previous one is used.

Loading on M ranks what N ranks saved: every rank reads the replicated files (model, optimizer,
meta); rank r reads `rank_{r}` when r < N, else gets no per-rank state (seed it from the run
seed, rank and step). The sampler state is global (seed, epoch, samples consumed), so it does
not depend on N.

A sharded checkpoint (FSDP) has no model.pt/optim.pt: `shards` holds its DCP files, and
`read_sharded` fills a state dict shaped for this rank (any world size; whole tensors too).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from checkpointing import format
from checkpointing.errors import CheckpointError, CorruptCheckpoint
from checkpointing.layout import (
    MANIFEST,
    META,
    MODEL,
    OPTIM,
    rank_file,
    scan,
    step_dir,
    verify,
)
from checkpointing.storage import open_fs


@dataclass
class LoadedCheckpoint:
    step: int
    uri: str
    manifest: dict[str, Any]
    meta: dict[str, Any]  # format, step, run_id, world_size, config (dict)
    model: dict[str, Any] | None
    optimizer: dict[str, Any] | None
    rank_state: dict[str, Any] | None  # {"rng": ..., "sampler": ...}; None when this rank did not exist
    shards: dict[str, bytes] | None = None  # a sharded checkpoint's files (verified), for read_sharded

    @property
    def sharded(self) -> bool:
        return self.shards is not None


def load_step(fs, root: str, step: int, *, rank: int = 0) -> LoadedCheckpoint:
    blobs = verify(fs, root, step)
    m = json.loads(blobs.pop(MANIFEST))
    try:
        meta = format.decode(blobs[META])
        meta = dict(meta)
        meta["config"] = json.loads(meta.pop("config_json"))
        model = format.decode(blobs[MODEL]) if MODEL in blobs else None
        optim = format.decode(blobs[OPTIM]) if OPTIM in blobs else None
        name = rank_file(rank)
        rank_state = format.decode(blobs[name]) if name in blobs else None
    except Exception as e:  # checksums matched, yet it does not decode: written wrong, not trusted
        raise CorruptCheckpoint(step, f"cannot decode: {type(e).__name__}: {e}") from None
    shards = {n: b for n, b in blobs.items() if format.is_shard_file(n)} or None
    if shards is not None and format.SHARD_INDEX not in shards:
        raise CorruptCheckpoint(step, f"sharded, but {format.SHARD_INDEX} is not in the manifest")
    return LoadedCheckpoint(step=step, uri=f"{root.rstrip('/')}/{step_dir(step)}", manifest=m, meta=meta,
                            model=model, optimizer=optim, rank_state=rank_state, shards=shards)


def read_sharded(loaded: LoadedCheckpoint, state: dict[str, Any], *, process_group=None) -> list[str]:
    """Every rank together (a collective): fill `state` in place from a sharded checkpoint, e.g.
    {"model": msd, "optim": osd} from torch's get_state_dict on this rank's model. Returns the
    checkpoint's keys `state` lacks (not read). Files that do not decode (checksums matched, yet
    written wrong) are reported as CorruptCheckpoint."""
    if loaded.shards is None:
        raise CheckpointError(f"checkpoint {loaded.uri} is not sharded (it holds model.pt/optim.pt)")
    try:
        return format.decode_sharded(loaded.shards, state, process_group=process_group)
    except pickle.UnpicklingError as e:
        raise CorruptCheckpoint(loaded.step, f"cannot decode {format.SHARD_INDEX}: {e}") from None


def sharded_keys(loaded: LoadedCheckpoint) -> set[str]:
    """The keys (DCP's dotted paths) a sharded checkpoint holds, read from its index alone."""
    try:
        return format.sharded_keys(loaded.shards or {})
    except (pickle.UnpicklingError, KeyError, EOFError, AttributeError) as e:
        raise CorruptCheckpoint(loaded.step, f"cannot decode {format.SHARD_INDEX}: {type(e).__name__}: {e}") from None


def load_latest(uri: str, *, rank: int = 0, storage_options: dict | None = None, max_step: int | None = None,
                on_corrupt: Callable[[CorruptCheckpoint], None] | None = None, fs=None) -> LoadedCheckpoint | None:
    """The newest committed checkpoint (at or below `max_step`) that verifies, or None if there is
    none. Corrupt ones are passed to `on_corrupt` (e.g. `records.corrupt_recorder`) and skipped.
    `fs`: an already open filesystem for `uri` (tests, or to reuse a connection)."""
    if fs is None:
        fs, root = open_fs(uri, storage_options)
    else:
        root = fs._strip_protocol(uri)
    for step in reversed(scan(fs, root).committed):
        if max_step is not None and step > max_step:
            continue
        try:
            return load_step(fs, root, step, rank=rank)
        except CorruptCheckpoint as e:
            if on_corrupt is not None:
                on_corrupt(e)
    return None


def require_latest(uri: str, **kwargs) -> LoadedCheckpoint:
    """load_latest, but no loadable checkpoint is a clear error."""
    found = load_latest(uri, **kwargs)
    if found is None:
        raise CheckpointError(f"{uri}: no committed checkpoint that verifies")
    return found
