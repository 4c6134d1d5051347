"""Find, verify and load checkpoints. Only committed ones (with a manifest) count; every file read
is checked against the manifest; a corrupt checkpoint is reported and the previous one is used.

Loading on M ranks what N ranks saved: every rank reads the replicated files (model, optimizer,
meta); rank r reads `rank_{r}` when r < N, else gets no per-rank state (seed it from the run
seed, rank and step). The sampler state is global (seed, epoch, samples consumed), so it does
not depend on N.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from checkpointing import format, manifest
from checkpointing.errors import CheckpointError, CorruptCheckpoint
from checkpointing.retry import with_retries
from checkpointing.storage import open_fs


def read(fs, path: str) -> bytes:
    """One file's bytes; throttling, resets and truncated bodies are retried, a missing file is not."""
    return with_retries(lambda: fs.cat_file(path), retries=5, backoff_s=0.2, max_backoff_s=5.0)


@dataclass
class Layout:
    committed: list[int]  # steps with a manifest, ascending
    partial: list[int]  # step folders without one (in progress or failed), ascending


def scan(fs, root: str) -> Layout:
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return Layout([], [])
    steps = sorted(s for s in (format.parse_step_dir(n) for n in names) if s is not None)
    done = {format.parse_step_dir(p.rsplit("/", 2)[-2]) for p in fs.glob(f"{root}/step_*/{format.MANIFEST}")}
    return Layout([s for s in steps if s in done], [s for s in steps if s not in done])


def read_manifest(fs, root: str, step: int) -> dict[str, Any]:
    return manifest.decode(read(fs, f"{root.rstrip('/')}/{format.step_dir(step)}/{format.MANIFEST}"), step)


@dataclass
class LoadedCheckpoint:
    step: int
    uri: str
    manifest: dict[str, Any]
    meta: dict[str, Any]  # format, step, run_id, world_size, config (dict)
    model: dict[str, Any] | None
    optimizer: dict[str, Any] | None
    rank_state: dict[str, Any] | None  # {"rng": ..., "sampler": ...}; None when this rank did not exist


def verify(fs, root: str, step: int) -> dict[str, bytes]:
    """Read every file of a committed checkpoint and check size and sha256; returns the bytes.
    Reading all files (not only this rank's) lets every rank reach the same verdict."""
    m = read_manifest(fs, root, step)
    path = f"{root.rstrip('/')}/{format.step_dir(step)}"
    blobs = {}
    for f in m["files"]:
        try:
            data = read(fs, f"{path}/{f['name']}")
        except FileNotFoundError:
            raise CorruptCheckpoint(step, f"{f['name']} is missing") from None
        manifest.check_file(m, f["name"], data)
        blobs[f["name"]] = data
    blobs[format.MANIFEST] = json.dumps(m).encode()
    return blobs


def load_step(fs, root: str, step: int, *, rank: int = 0) -> LoadedCheckpoint:
    blobs = verify(fs, root, step)
    m = json.loads(blobs.pop(format.MANIFEST))
    try:
        meta = format.decode(blobs[format.META])
        meta = dict(meta)
        meta["config"] = json.loads(meta.pop("config_json"))
        model = format.decode(blobs[format.MODEL]) if format.MODEL in blobs else None
        optim = format.decode(blobs[format.OPTIM]) if format.OPTIM in blobs else None
        name = format.rank_file(rank)
        rank_state = format.decode(blobs[name]) if name in blobs else None
    except Exception as e:  # checksums matched, yet it does not decode: written wrong, not trusted
        raise CorruptCheckpoint(step, f"cannot decode: {type(e).__name__}: {e}") from None
    return LoadedCheckpoint(step=step, uri=f"{root.rstrip('/')}/{format.step_dir(step)}", manifest=m, meta=meta,
                            model=model, optimizer=optim, rank_state=rank_state)


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
