"""Random access to fixed-length token sequences.

Local shards are memory-mapped in place. Remote shards (any other fsspec protocol) are read
through the node-local ShardCache, which downloads each shard once per node and prefetches the
shards the sampler will ask for next. Opening a dataset checks the index against the shards'
sizes in one listing per directory; contents are checked (sha256) when a shard is downloaded,
and for local shards on first use when `verify_local` is set.
"""

from __future__ import annotations

import hashlib
import posixpath

import fsspec
import numpy as np
import torch

from common.errors import DataError
from dataloading.cache import ShardCache
from dataloading.config import DataConfig, ShuffleMode
from dataloading.index import INDEX_NAME, Index, Shard, join, read_index, token_dtype
from dataloading.sampler import BlockOrder, GlobalSampler


def is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


class TokenDataset:
    def __init__(self, uri: str, split: str = "train", *, cache: ShardCache | None = None,
                 verify_local: bool = False, storage_options: dict | None = None):
        self.uri = uri
        self.split = split
        self.storage_options = dict(storage_options or {})
        self.index: Index = read_index(uri, storage_options=self.storage_options)
        self.seq_len = self.index.seq_len
        self.dtype = token_dtype(self.index.dtype)  # little-endian uint8/16/32, checked by read_index
        self.shards: list[Shard] = self.index.shards(split)
        if not self.shards:
            raise DataError(f"{join(uri, INDEX_NAME)}: split {split!r} has no shards")
        self.fs, self.root = fsspec.core.url_to_fs(uri, **self.storage_options)
        self.local = is_local(self.fs)
        self.verify_local = verify_local
        self._check_index()
        self._check_files()
        counts = np.array([s.num_sequences for s in self.shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        self.num_sequences = int(self._ends[-1])
        self.cache = None if self.local else (cache or ShardCache(storage_options=self.storage_options))
        self._arrays: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str = "train") -> TokenDataset:
        """The dataset at cfg.uri, with a node cache for remote shards as the config says."""
        probe = fsspec.core.url_to_fs(cfg.uri, **cfg.storage_options)[0]
        cache = None
        if not is_local(probe):
            cache = ShardCache(cfg.cache_dir or None, max_bytes=cfg.cache_size_mb << 20,
                               storage_options=cfg.storage_options)
        return cls(cfg.uri, split, cache=cache, verify_local=cfg.verify_local, storage_options=cfg.storage_options)

    # --- checks at open ---------------------------------------------------------------------

    def _check_index(self) -> None:
        row = self.seq_len * self.dtype.itemsize
        for s in self.shards:
            if s.num_sequences < 1 or s.bytes != s.num_sequences * row:
                raise DataError(
                    f"{join(self.uri, INDEX_NAME)}: shard {s.name} says {s.num_sequences} sequences in "
                    f"{s.bytes} bytes, expected {s.num_sequences} x {row} bytes; the index is inconsistent"
                )

    def _check_files(self) -> None:
        """One listing per shard directory: every shard present with the size the index says."""
        by_dir: dict[str, list[Shard]] = {}
        for s in self.shards:
            by_dir.setdefault(posixpath.dirname(s.name), []).append(s)
        for d, shards in by_dir.items():
            try:
                listing = self.fs.ls(join(self.root, d) if d else self.root, detail=True)
            except FileNotFoundError:
                listing = []
            sizes = {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in listing}
            for s in shards:
                path = join(self.uri, s.name)
                size = sizes.get(posixpath.basename(s.name))
                if size is None:
                    raise DataError(f"{path}: shard listed in the index is missing")
                if size != s.bytes:
                    raise DataError(f"{path}: shard has {size} bytes, the index says {s.bytes}; truncated or replaced?")

    # --- access -----------------------------------------------------------------------------

    def _array(self, i: int) -> np.ndarray:
        arr = self._arrays.get(i)
        if arr is None:
            shard = self.shards[i]
            if self.local:
                path = join(self.root, shard.name)
                if self.verify_local:
                    self._verify(path, shard)
                arr = np.memmap(path, dtype=self.dtype, mode="r")
            else:
                arr = self._map_cached(shard)
            arr = arr.reshape(shard.num_sequences, self.seq_len)
            self._arrays[i] = arr
        return arr

    def _map_cached(self, shard: Shard) -> np.ndarray:
        for _ in range(3):  # another rank may evict the file between get() and opening it
            try:
                return np.memmap(self.cache.get(self.uri, shard), dtype=self.dtype, mode="r")
            except FileNotFoundError:
                continue
        raise DataError(f"{join(self.uri, shard.name)}: cached copy keeps disappearing; "
                        f"is data.cache_size_mb ({self.cache.max_bytes >> 20} MB) smaller than a few shards?")

    def _verify(self, path: str, shard: Shard) -> None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)
        if digest.hexdigest() != shard.sha256:
            raise DataError(f"{path}: sha256 does not match the index ({shard.sha256[:16]}...); "
                            "the shard was changed or corrupted")

    def shard_of(self, ids) -> np.ndarray:
        """Index (into self.shards) of the shard holding each sequence id."""
        return np.searchsorted(self._ends, np.asarray(ids, dtype=np.int64), side="right")

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        s = int(self.shard_of(i))
        row = self._array(s)[i - int(self._starts[s])]
        return row.astype(row.dtype.newbyteorder("="))  # a copy in native order: writable, safe for torch

    def batch(self, ids) -> torch.Tensor:
        """(len(ids), seq_len) int64 tensor of the given global sequence ids, in order."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_sequences):
            raise IndexError(f"sequence ids out of range [0, {self.num_sequences}): {ids.min()}..{ids.max()}")
        out = np.empty((len(ids), self.seq_len), dtype=np.int64)
        which = self.shard_of(ids)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self._array(int(s))[ids[sel] - self._starts[s]]
        return torch.from_numpy(out)

    def release(self, keep: set[int]) -> None:
        """Drop memory maps of remote shards not in `keep` so evicted files can really go."""
        if not self.local:
            for i in [i for i in self._arrays if i not in keep]:
                del self._arrays[i]

    def close(self) -> None:
        self._arrays.clear()
        if self.cache is not None:
            self.cache.close()

    # --- sampling ---------------------------------------------------------------------------

    def sampler(self, cfg: DataConfig, *, seed: int) -> GlobalSampler:
        """The training sampler for this dataset as `cfg` asks; prefetches remote shards ahead of use."""
        mode = cfg.shuffle
        if mode is ShuffleMode.AUTO:
            mode = ShuffleMode.GLOBAL if self.local else ShuffleMode.BLOCK
        block_size = cfg.block_size or self.shards[0].num_sequences
        sampler = GlobalSampler(len(self), cfg.global_batch_size, seed, mode=mode, block_size=block_size,
                                window_blocks=cfg.window_blocks)
        if not self.local:
            sampler.on_step = Lookahead(self, sampler, steps=cfg.prefetch_steps)
        return sampler


class Lookahead:
    """Told each step a rank asks for; marks the shards of the next few steps (and, in block mode,
    of the current and next window) as needed, so the cache prefetches them and evicts the rest."""

    def __init__(self, data: TokenDataset, sampler: GlobalSampler, *, steps: int):
        self.data, self.sampler, self.steps = data, sampler, steps
        self._by_step: dict[int, np.ndarray] = {}
        self._last = -1

    def _shards_of_step(self, step: int) -> np.ndarray:
        got = self._by_step.get(step)
        if got is None:
            got = np.unique(self.data.shard_of(self.sampler.global_batch(step)))
            self._by_step[step] = got
        return got

    def _window_shards(self, step: int) -> list[int]:
        s = self.sampler
        epoch, k = divmod(step, s.batches_per_epoch)
        order = s.order(epoch)
        assert isinstance(order, BlockOrder)
        window = int(order.window_of(np.array([k * s.global_batch_size]))[0])
        blocks = list(order.window_blocks_of(window))
        nxt = order.window_blocks_of(window + 1)
        if nxt.size == 0:  # last window of the epoch: the next epoch's first window follows
            nxt = s.order(epoch + 1).window_blocks_of(0)
        shards: list[int] = []
        for b in [*blocks, *nxt]:
            first = int(b) * s.block_size
            last = min(first + s.block_size, s.num_samples) - 1
            shards.extend(range(int(self.data.shard_of(first)), int(self.data.shard_of(last)) + 1))
        return shards

    def __call__(self, step: int) -> None:
        if step == self._last:
            return
        self._last = step
        for old in [k for k in self._by_step if k < step]:
            del self._by_step[old]
        ordered: list[int] = []
        for st in range(step, step + self.steps + 1):
            ordered.extend(int(i) for i in self._shards_of_step(st))
        if self.sampler.window_blocks:
            ordered.extend(self._window_shards(step))
        wanted = list(dict.fromkeys(ordered))  # current step first, no duplicates
        self.data.cache.need(self.data.uri, [self.data.shards[i] for i in wanted])
        self.data.release(set(wanted))
