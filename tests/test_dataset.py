"""TokenDataset: local memory maps, remote shards through the cache, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import sysconfig
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from common.errors import DataError
from dataloading.config import DataConfig, ShuffleMode
from dataloading.dataset import TokenDataset
from dataloading.prepare import prepare

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def data(tmp_path, tiny_data) -> Path:
    """A private copy of the session's tiny dataset, safe to damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "ds"))


def _index(path: Path) -> dict:
    return json.loads((path / "index.json").read_text())


def test_batch_rows_are_the_sequences_in_order(tiny_data):
    ds = TokenDataset(tiny_data, "train")
    ids = [len(ds) - 1, 0, 5, 5, 17]
    batch = ds.batch(ids)
    assert batch.shape == (5, ds.seq_len) and str(batch.dtype) == "torch.int64"
    for row, i in zip(batch.numpy(), ids, strict=True):
        assert np.array_equal(row, ds[i])
    with pytest.raises(IndexError):
        ds.batch([len(ds)])


def test_ids_across_shard_boundaries(tmp_path):
    out = str(tmp_path / "small-shards")
    prepare([str(STDLIB / "json")], out, seq_len=33, include=["*.py"], shard_mb=0.005, log=lambda *a: None)
    ds = TokenDataset(out, "train")
    assert len(ds.shards) > 2
    raw = np.concatenate([np.fromfile(Path(out) / s.name, dtype=np.uint8) for s in ds.shards]).reshape(-1, 33)
    ids = np.random.default_rng(0).permutation(len(ds))[:64]
    assert np.array_equal(ds.batch(ids).numpy(), raw[ids])


def test_missing_shard(data):
    name = _index(data)["splits"]["train"]["shards"][0]["name"]
    (data / name).unlink()
    with pytest.raises(DataError, match=f"{name}: shard listed in the index is missing"):
        TokenDataset(str(data), "train")


def test_truncated_shard(data):
    name = _index(data)["splits"]["train"]["shards"][0]["name"]
    blob = (data / name).read_bytes()
    (data / name).write_bytes(blob[:-10])
    with pytest.raises(DataError, match=f"{name}: shard has {len(blob) - 10} bytes, the index says {len(blob)}"):
        TokenDataset(str(data), "train")


def test_index_inconsistent_with_itself(data):
    doc = _index(data)
    doc["splits"]["train"]["shards"][0]["num_sequences"] += 1
    (data / "index.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="index.json: shard train/00000.bin says .* the index is inconsistent"):
        TokenDataset(str(data), "train")


def test_changed_contents_caught_by_checksum(data):
    name = _index(data)["splits"]["train"]["shards"][0]["name"]
    blob = bytearray((data / name).read_bytes())
    blob[0] ^= 1
    (data / name).write_bytes(bytes(blob))
    TokenDataset(str(data), "train")[0]  # same size: passes without verify_local
    with pytest.raises(DataError, match=f"{name}: sha256 does not match the index"):
        TokenDataset(str(data), "train", verify_local=True)[0]


def test_no_index(tmp_path):
    with pytest.raises(DataError, match="no dataset index here"):
        TokenDataset(str(tmp_path), "train")


def test_dataset_smaller_than_one_global_batch(tiny_data):
    ds = TokenDataset(tiny_data, "val")
    with pytest.raises(DataError, match=f"{len(ds)} sequences, fewer than one global batch"):
        ds.sampler(DataConfig(uri=tiny_data, global_batch_size=len(ds) + 1), seed=0)


def test_sampler_from_config_resolves_auto_mode(tiny_data):
    ds = TokenDataset(tiny_data, "train")
    s = ds.sampler(DataConfig(uri=tiny_data, global_batch_size=8), seed=0)
    assert s.mode is ShuffleMode.GLOBAL and s.on_step is None
    s = ds.sampler(DataConfig(uri=tiny_data, global_batch_size=8, shuffle=ShuffleMode.BLOCK), seed=0)
    assert s.mode is ShuffleMode.BLOCK and s.block_size == ds.shards[0].num_sequences


@pytest.mark.parametrize("shuffle", [ShuffleMode.AUTO, ShuffleMode.GLOBAL])
def test_remote_dataset_reads_through_the_cache_and_prefetches(tmp_path, shuffle):
    uri = f"memory://ds-{uuid.uuid4().hex}"
    small = str(tmp_path / "small")
    prepare([str(STDLIB / "json")], small, seq_len=33, include=["*.py"], shard_mb=0.005, log=lambda *a: None)
    fs = fsspec.filesystem("memory")
    fs.put(small, uri.removeprefix("memory://"), recursive=True)
    local = TokenDataset(small, "train")
    cfg = DataConfig(uri=uri, global_batch_size=8, cache_dir=str(tmp_path / "cache"), prefetch_steps=2,
                     shuffle=shuffle)
    remote = TokenDataset.from_config(cfg, "train")
    try:
        assert not remote.local and remote.cache is not None
        sampler = remote.sampler(cfg, seed=0)
        assert sampler.mode is (ShuffleMode.BLOCK if shuffle is ShuffleMode.AUTO else shuffle)  # auto: block
        for step in range(3 * sampler.batches_per_epoch // 2):  # bounded: 1.5 epochs
            ids = sampler.local_batch(step, 1, 2)
            assert np.array_equal(remote.batch(ids).numpy(), local.batch(ids).numpy())
        remote.cache.close()
        assert remote.cache.downloads == len(remote.shards)  # each once: the cache bound is not reached
        assert remote.cache.prefetch_error is None
    finally:
        remote.close()
        fs.rm(uri.removeprefix("memory://"), recursive=True)


def test_dataloader_with_the_torch_sampler(tiny_data):
    import torch

    from dataloading.sampler import DistributedGlobalSampler, GlobalSampler

    ds = TokenDataset(tiny_data, "train")
    sampler = DistributedGlobalSampler(len(ds), 8, seed=2, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)
    ref = GlobalSampler(len(ds), 8, 2)
    for step, batch in zip(range(3), loader, strict=False):
        assert torch.equal(batch.long(), ds.batch(ref.local_batch(step, 1, 2)))


def test_block_mode_keeps_a_remote_node_cache_bounded(tmp_path):
    from dataloading.cache import ShardCache

    small = str(tmp_path / "small")
    prepare([str(STDLIB / "json")], small, seq_len=33, include=["*.py"], shard_mb=0.002, log=lambda *a: None)
    uri = f"memory://ds-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.put(small, uri.removeprefix("memory://"), recursive=True)
    local = TokenDataset(small, "train")
    bound = 4 * local.shards[0].bytes
    cache = ShardCache(tmp_path / "cache", max_bytes=bound)
    remote = TokenDataset(uri, "train", cache=cache)
    cfg = DataConfig(uri=uri, global_batch_size=4, shuffle=ShuffleMode.BLOCK, window_blocks=1, prefetch_steps=1)
    try:
        assert len(remote.shards) >= 8
        sampler = remote.sampler(cfg, seed=3)
        for step in range(sampler.batches_per_epoch):  # bounded: one epoch
            ids = sampler.local_batch(step, 0, 1)
            assert np.array_equal(remote.batch(ids).numpy(), local.batch(ids).numpy())
            assert len(np.unique(remote.shard_of(ids))) <= 2  # one window = one block, maybe two shards
        cache.close()
        on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.bin"))
        assert on_disk <= bound
        assert len(remote.shards) <= cache.downloads <= 2 * len(remote.shards)
    finally:
        remote.close()
        fs.rm(uri.removeprefix("memory://"), recursive=True)
