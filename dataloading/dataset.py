"""Random access to fixed-length token sequences. Local shards are memory-mapped; remote ones are
read whole through fsspec (the node-local cache replaces that for large remote datasets)."""

from __future__ import annotations

import fsspec
import numpy as np
import torch

from dataloading.index import Index, join, read_index
from orchestrator.errors import DataError


class TokenDataset:
    def __init__(self, uri: str, split: str = "train"):
        self.index: Index = read_index(uri)
        self.split = split
        self.seq_len = self.index.seq_len
        self.dtype = np.dtype(self.index.dtype)
        shards = self.index.shards(split)
        if not shards:
            raise DataError(f"{uri}: split {split!r} has no shards")
        self._arrays = [self._open(uri, s) for s in shards]
        counts = np.array([s.num_sequences for s in shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self.num_sequences = int(self._ends[-1])

    def _open(self, uri: str, shard) -> np.ndarray:
        path = join(uri, shard.name)
        expected = shard.num_sequences * self.seq_len * self.dtype.itemsize
        fs, p = fsspec.core.url_to_fs(path)
        try:
            size = fs.size(p)
        except FileNotFoundError:
            raise DataError(f"{path}: shard listed in the index is missing") from None
        if size != expected or shard.bytes != expected:
            raise DataError(f"{path}: shard has {size} bytes, index says {shard.bytes} (expected {expected}); truncated or replaced?")
        if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
            arr = np.memmap(p, dtype=self.dtype, mode="r")
        else:
            arr = np.frombuffer(fs.cat_file(p), dtype=self.dtype)
        return arr.reshape(shard.num_sequences, self.seq_len)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        s = int(np.searchsorted(self._ends, i, side="right"))
        start = 0 if s == 0 else int(self._ends[s - 1])
        return self._arrays[s][i - start]

    def batch(self, ids) -> torch.Tensor:
        """(len(ids), seq_len) int64 tensor of the given global sequence ids, in order."""
        rows = np.stack([self[int(i)] for i in ids]).astype(np.int64)
        return torch.from_numpy(rows)
