"""The manifest: the commit record of a checkpoint, written last, after every shard is confirmed.

A folder without a manifest is not a checkpoint (a write in progress, or one that failed).
Every file is listed with its size and sha256, so a reader can tell a good checkpoint from a
truncated or bit-flipped one before trusting it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from checkpointing.errors import CorruptCheckpoint

# Of manifests and meta files; a newer one is refused by this reader. A checkpoint says the
# lowest version that can read it: replicated ones stay 1 (readers from before sharding load
# them), sharded ones are 2 (a reader of 1 would find no model.pt: it must refuse them instead).
FORMAT_VERSION = 2
REPLICATED_FORMAT = 1
SHARDED_FORMAT = 2
SHARD_KINDS = ("shard", "shard_index")


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str
    rank: int
    # "replicated" (one copy, from rank 0), "rank" (one per rank), "shard" (one slice of the
    # sharded state per rank), "shard_index" (where every slice lives; one copy, from rank 0)
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "rank": self.rank, "kind": self.kind}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(name: str, data: bytes, rank: int) -> FileEntry:
    kind = ("rank" if name.startswith("rank_") else "shard" if ".shard_" in name
            else "shard_index" if name.endswith(".metadata") else "replicated")
    return FileEntry(name=name, size=len(data), sha256=sha256(data), rank=rank, kind=kind)


def build(*, step: int, run_id: str, world_size: int, files: list[dict[str, Any]],
          metrics: dict[str, float] | None = None, timings: dict[str, float] | None = None) -> dict[str, Any]:
    sharded = any(f.get("kind") in SHARD_KINDS for f in files)
    return {
        "format": SHARDED_FORMAT if sharded else REPLICATED_FORMAT,
        "step": step,
        "run_id": run_id,
        "world_size": world_size,
        "committed_at": time.time(),
        "bytes": sum(f["size"] for f in files),
        "metrics": dict(metrics or {}),
        "timings": dict(timings or {}),
        "files": sorted(files, key=lambda f: f["name"]),
    }


def encode(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def decode(data: bytes, step: int) -> dict[str, Any]:
    try:
        m = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(step, f"manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), list) or m.get("step") != step:
        raise CorruptCheckpoint(step, "manifest lacks files or names another step")
    if m.get("format", 0) > FORMAT_VERSION:
        raise CorruptCheckpoint(step, f"manifest format {m.get('format')} is newer than this reader ({FORMAT_VERSION})")
    return m


def check_file(manifest: dict[str, Any], name: str, data: bytes) -> None:
    """Raise CorruptCheckpoint unless `data` is exactly what the manifest recorded for `name`."""
    step = manifest["step"]
    listed = {f["name"]: f for f in manifest["files"]}
    if name not in listed:
        raise CorruptCheckpoint(step, f"{name} is not in the manifest")
    f = listed[name]
    if len(data) != f["size"]:
        raise CorruptCheckpoint(step, f"{name} has {len(data)} bytes, the manifest says {f['size']}")
    if sha256(data) != f["sha256"]:
        raise CorruptCheckpoint(step, f"{name} does not match its sha256 in the manifest")
