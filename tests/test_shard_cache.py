"""The node-local shard cache: fsspec memory:// for the logic, a moto S3 server on 127.0.0.1 for
the real path, and several processes sharing one cache directory (each shard downloaded once)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import socket
import sysconfig
import threading
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from common.errors import DataError
from dataloading.cache import ShardCache
from dataloading.config import DataConfig
from dataloading.index import Shard
from dataloading.prepare import prepare

# TokenDataset (and so torch) is imported inside the tests that use it: the spawned "ranks" below
# re-import this module, and three torch imports on a small machine cost seconds.

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture
def memory_shards():
    """(uri, shards): five 1000-byte shards on memory://, removed afterwards."""
    root = f"ds-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    shards = []
    for i in range(5):
        blob = bytes([i]) * 1000
        name = f"train/{i:05d}.bin"
        fs.pipe(f"{root}/{name}", blob)
        shards.append(Shard(name, 10, len(blob), hashlib.sha256(blob).hexdigest()))
    yield f"memory://{root}", shards
    fs.rm(root, recursive=True)


def test_each_shard_is_downloaded_once_and_verified(memory_shards, tmp_path):
    uri, shards = memory_shards
    cache = ShardCache(tmp_path, max_bytes=1 << 20)
    first = cache.get(uri, shards[0])
    assert first.read_bytes() == bytes([0]) * 1000
    assert cache.get(uri, shards[0]) == first
    assert cache.downloads == 1
    assert ShardCache(tmp_path).get(uri, shards[0]) == first  # another rank of the node: no download


def test_concurrent_gets_download_once(memory_shards, tmp_path):
    uri, shards = memory_shards
    cache = ShardCache(tmp_path)
    threads = [threading.Thread(target=cache.get, args=(uri, shards[1])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert cache.downloads == 1


def test_bad_shards_are_data_errors_naming_the_url(memory_shards, tmp_path):
    uri, shards = memory_shards
    cache = ShardCache(tmp_path)
    wrong_hash = Shard(shards[0].name, 10, 1000, "0" * 64)
    with pytest.raises(DataError, match=f"{uri}/train/00000.bin: sha256 .* does not match the index"):
        cache.get(uri, wrong_hash)
    wrong_size = Shard(shards[0].name, 10, 999, shards[0].sha256)
    with pytest.raises(DataError, match="00000.bin: shard has 1000 bytes, the index says 999"):
        cache.get(uri, wrong_size)
    with pytest.raises(DataError, match="train/00099.bin: shard listed in the index is missing"):
        cache.get(uri, Shard("train/00099.bin", 10, 1000, "0" * 64))
    assert not list(tmp_path.glob("*/train/*.bin")) and not list(tmp_path.glob("*/train/*.tmp*"))


def test_cache_stays_bounded_and_keeps_what_is_needed(memory_shards, tmp_path):
    uri, shards = memory_shards
    cache = ShardCache(tmp_path, max_bytes=2500)  # room for two shards
    for i, shard in enumerate(shards):
        cache.need(uri, [shard])  # what the sampler says comes next
        cache.get(uri, shard)
        on_disk = sorted(p.name for p in tmp_path.glob("*/train/*.bin"))
        assert sum(p.stat().st_size for p in tmp_path.glob("*/train/*.bin")) <= 2500
        assert any(name.endswith(f".{i:05d}.bin") for name in on_disk)
    cache.close()
    assert cache.downloads == 5


def test_prefetch_fetches_in_the_background(memory_shards, tmp_path):
    uri, shards = memory_shards
    cache = ShardCache(tmp_path)
    cache.need(uri, shards)
    for shard in shards:  # get() waits on the shard's lock if the prefetcher holds it
        assert cache.get(uri, shard).stat().st_size == 1000
    cache.close()
    assert cache.downloads == 5 and cache.prefetch_error is None


# --- real S3 (moto) ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(storage_options, s3 uri, local copy) of a small dataset in a moto S3 server on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        local = str(tmp_path_factory.mktemp("s3src") / "ds")
        prepare([str(STDLIB / "json")], local, seq_len=33, include=["*.py"], shard_mb=0.005, log=lambda *a: None)
        fs = fsspec.filesystem("s3", **opts)
        fs.mkdir("data")
        fs.put(local, "data/ds", recursive=True)
        yield opts, "s3://data/ds", local
    finally:
        server.stop()


def test_s3_dataset_matches_the_local_copy(s3, tmp_path):
    from dataloading.dataset import TokenDataset

    opts, uri, local = s3
    cfg = DataConfig(uri=uri, global_batch_size=8, cache_dir=str(tmp_path), storage_options=opts)
    remote = TokenDataset.from_config(cfg, "train")
    try:
        ref = TokenDataset(local, "train")
        sampler = remote.sampler(cfg, seed=1)
        for step in range(20):
            ids = sampler.local_batch(step, 0, 1)
            assert np.array_equal(remote.batch(ids).numpy(), ref.batch(ids).numpy())
    finally:
        remote.close()


def test_s3_truncated_shard_is_named(s3, tmp_path):
    from dataloading.dataset import TokenDataset

    opts, uri, local = s3
    fs = fsspec.filesystem("s3", **opts)
    fs.copy("data/ds", "data/bad", recursive=True)
    name = "data/bad/train/00001.bin"
    fs.pipe(name, fs.cat(name)[:-5])
    with pytest.raises(DataError, match="s3://data/bad/train/00001.bin: shard has .* bytes, the index says"):
        TokenDataset("s3://data/bad", "train", storage_options=opts)


def _rank(cache_dir: str, uri: str, opts: dict, shards: list, order_seed: int, barrier, out) -> None:
    cache = ShardCache(cache_dir, storage_options=opts)
    order = np.random.default_rng(order_seed).permutation(len(shards))
    barrier.wait(timeout=60)
    cache.need(uri, [shards[i] for i in order[: len(order) // 2]])  # prefetcher races the foreground
    for i in order:
        cache.get(uri, shards[i])
    cache.close()
    out.put(cache.downloads)


def test_ranks_of_a_node_download_each_shard_once(s3, tmp_path):
    from dataloading.index import read_index

    opts, uri, local = s3
    shards = read_index(local).shards("train")
    ctx = mp.get_context("spawn")  # the moto server's threads live in this process: do not fork them
    procs, barrier, out = [], ctx.Barrier(3), ctx.Queue()
    for r in range(3):
        p = ctx.Process(target=_rank, args=(str(tmp_path), uri, opts, shards, r, barrier, out))
        p.start()
        procs.append(p)
    counts = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert sum(counts) == len(shards) >= 3


def test_a_dataset_rewritten_at_the_same_uri_is_not_served_stale(memory_shards, tmp_path):
    uri, shards = memory_shards
    cache = ShardCache(tmp_path)
    old = cache.get(uri, shards[2]).read_bytes()
    blob = b"\x07" * 1000
    fsspec.filesystem("memory").pipe(f"{uri.removeprefix('memory://')}/{shards[2].name}", blob)
    new = Shard(shards[2].name, 10, 1000, hashlib.sha256(blob).hexdigest())
    assert cache.get(uri, new).read_bytes() == blob != old
    assert cache.downloads == 2


def test_downloads_left_by_a_dead_rank_are_cleaned_up(memory_shards, tmp_path):
    uri, shards = memory_shards
    cache = ShardCache(tmp_path)
    dead = cache.local_path(uri, shards[0]).with_name("x.00000.bin.tmp999.1")
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"partial")
    os.utime(dead, (0, 0))  # long ago
    cache.get(uri, shards[1])
    assert not dead.exists()
