"""How a checkpoint location is laid out, and finding what is in it, without torch: the driver
and the CLI scan locations, only ranks decode files (format.py).

One folder per checkpoint, `step_00000100/` (100 optimizer steps done); `MANIFEST.json` is
written last, so a folder with one is committed and a folder without one is partial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from checkpointing import manifest
from checkpointing.errors import CorruptCheckpoint
from checkpointing.retry import with_retries

MANIFEST = "MANIFEST.json"
MODEL, OPTIM, META = "model.pt", "optim.pt", "meta.pt"


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def parse_step_dir(name: str) -> int | None:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith("step_") and base[5:].isdigit():
        return int(base[5:])
    return None


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


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
    steps = sorted(s for s in (parse_step_dir(n) for n in names) if s is not None)
    done = {parse_step_dir(p.rsplit("/", 2)[-2]) for p in fs.glob(f"{root}/step_*/{MANIFEST}")}
    return Layout([s for s in steps if s in done], [s for s in steps if s not in done])


def read_manifest(fs, root: str, step: int) -> dict[str, Any]:
    return manifest.decode(read(fs, f"{root.rstrip('/')}/{step_dir(step)}/{MANIFEST}"), step)


def verify(fs, root: str, step: int) -> dict[str, bytes]:
    """Read every file of a committed checkpoint and check size and sha256; returns the bytes.
    Reading all files (not only this rank's) lets every rank reach the same verdict."""
    m = read_manifest(fs, root, step)
    path = f"{root.rstrip('/')}/{step_dir(step)}"
    blobs = {}
    for f in m["files"]:
        try:
            data = read(fs, f"{path}/{f['name']}")
        except FileNotFoundError:
            raise CorruptCheckpoint(step, f"{f['name']} is missing") from None
        manifest.check_file(m, f["name"], data)
        blobs[f["name"]] = data
    blobs[MANIFEST] = json.dumps(m).encode()
    return blobs
