"""`orchestrator data prepare`: text files -> byte-token shards plus an index.

The held-out split is chosen per file by a stable hash of its relative path, so the same
sources always give the same split, on any machine.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path

import fsspec
import numpy as np

from dataloading.index import INDEX_NAME, Index, Shard, join
from orchestrator.errors import DataError

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".venv", "node_modules"}


def find_files(sources: list[str], include: list[str]) -> list[tuple[str, Path]]:
    """(relative name, path) for every matching text file under the sources, sorted."""
    found: list[tuple[str, Path]] = []
    for src in sources:
        root = Path(src)
        if root.is_file():
            found.append((root.name, root))
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
                for name in sorted(filenames):
                    if any(fnmatch.fnmatch(name, pat) for pat in include):
                        p = Path(dirpath) / name
                        found.append((str(p.relative_to(root)), p))
        else:
            raise DataError(f"data prepare: source not found: {src}")
    if not found:
        raise DataError(f"data prepare: no files matching {','.join(include)} under {' '.join(sources)}")
    return sorted(found)


def is_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def prepare(
    sources: list[str],
    out: str,
    *,
    seq_len: int = 129,
    val_fraction: float = 0.01,
    include: list[str] = ("*.py", "*.txt", "*.md", "*.rst"),
    shard_mb: float = 16.0,
    log=print,
) -> Index:
    if seq_len < 2:
        raise DataError(f"data prepare: --seq-len must be at least 2, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise DataError(f"data prepare: --val-fraction must be between 0 and 1, got {val_fraction}")
    files = find_files(sources, list(include))
    streams: dict[str, list[bytes]] = {"train": [], "val": []}
    skipped = 0
    for rel, path in files:
        data = path.read_bytes()
        if b"\x00" in data:  # binary, not text
            skipped += 1
            continue
        streams["val" if is_val(rel, val_fraction) else "train"].append(data + b"\n")
    if not streams["val"] and len(streams["train"]) > 1:
        streams["val"].append(streams["train"].pop())  # never leave eval without data
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    per_shard = max(1, int(shard_mb * 2**20) // seq_len)
    splits: dict[str, list[Shard]] = {}
    for split, chunks in streams.items():
        tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        n = len(tokens) // seq_len
        if n == 0:
            raise DataError(f"data prepare: split {split!r} has {len(tokens)} tokens, less than one sequence of {seq_len}")
        seqs = tokens[: n * seq_len].reshape(n, seq_len)
        shards = []
        for i, start in enumerate(range(0, n, per_shard)):
            block = np.ascontiguousarray(seqs[start : start + per_shard]).tobytes()
            name = f"{split}/{i:05d}.bin"
            fs.makedirs(join(root, split), exist_ok=True)
            with fs.open(join(root, name), "wb") as f:
                f.write(block)
            shards.append(Shard(name, len(block) // seq_len, len(block), hashlib.sha256(block).hexdigest()))
        splits[split] = shards
        log(f"{split}: {len(chunks)} files, {len(tokens):,} tokens -> {n:,} sequences of {seq_len} in {len(shards)} shards")
    index = Index(out, "uint8", seq_len, 256, splits)
    with fs.open(join(root, INDEX_NAME), "w") as f:  # last: the dataset exists from here on
        f.write(index.to_json())
    if skipped:
        log(f"skipped {skipped} files that look binary (contain NUL bytes)")
    log(f"wrote {join(out, INDEX_NAME)}")
    return index
