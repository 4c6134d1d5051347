"""Checkpoints against a real S3 endpoint: moto on 127.0.0.1 behind our fault-injecting proxy."""

from __future__ import annotations

import threading

import pytest

from checkpointing.config import CheckpointConfig
from checkpointing.errors import CheckpointError
from checkpointing.layout import scan, verify
from checkpointing.loader import load_latest
from checkpointing.storage import check_destination
from tests import s3_server
from tests.s3_server import open_s3, run_ranks

moto_server, s3 = s3_server.moto_server, s3_server.s3  # the fixtures, under their own names


def fast_cfg(**kw) -> CheckpointConfig:
    base = dict(every_steps=5, start_jitter_s=0.01, backoff_s=0.01, max_backoff_s=0.1, retries=4,
                commit_timeout_s=300)
    return CheckpointConfig(**{**base, **kw})


def test_throttling_resets_and_truncated_bodies_are_retried(s3):
    proxy, bucket, options = s3
    fs, root = open_s3(f"s3://{bucket}/run", options)
    proxy.add("503", method="PUT", path_contains="model.pt", times=2)
    proxy.add("429", method="PUT", path_contains="optim.pt", times=1)
    proxy.add("reset", method="PUT", path_contains="rank_00001", times=3)
    proxy.add("delay", method="PUT", path_contains="meta.pt", delay_s=0.2)
    results, coord = run_ranks(fs, root, world_size=2, steps=10, cfg=fast_cfg())
    assert [r.status for r in results[0]] == ["committed", "committed"]
    assert proxy.state.served == {"503": 2, "429": 1, "reset": 3, "delay": 1}
    proxy.add("truncate", method="GET", path_contains="model.pt", times=1)
    ck = load_latest(root, fs=fs)
    assert ck.step == 10 and proxy.state.served["truncate"] == 1
    for step in (5, 10):
        verify(fs, root, step)  # every committed checkpoint loads and verifies


def test_write_slots_hold_the_cap_at_the_store(s3):
    proxy, bucket, options = s3
    proxy.state.cap = 2  # above 2 writes in flight the "store" answers 503 SlowDown
    proxy.state.write_delay_s = 0.03  # long enough for writes to overlap if nothing staggers them
    fs, root = open_s3(f"s3://{bucket}/run", options)
    cfg = fast_cfg(max_concurrent_writes=2, per_node_writes=2, retries=0)  # no retry hides a breach
    results, coord = run_ranks(fs, root, world_size=4, steps=10, cfg=cfg,
                               nodes={0: "a", 1: "a", 2: "b", 3: "b"})
    print("peak writes at the store:", proxy.state.peak, "slot peak:", coord.slots.peak)
    assert proxy.state.peak <= 2 and "cap" not in proxy.state.served
    assert [r.status for r in results[0]] == ["committed", "committed"]
    assert scan(fs, root).committed == [5, 10]


def test_the_proxy_sees_a_flood_when_nothing_staggers(s3):
    """Control for the test above: the counter is real, unstaggered writes do exceed the cap."""
    proxy, bucket, options = s3
    proxy.state.cap = 2
    proxy.state.write_delay_s = 0.1
    fs, _ = open_s3(f"s3://{bucket}/flood", options)
    errors = []

    def put(i):
        try:
            fs.pipe_file(f"{bucket}/flood/f{i}", b"x" * 1000)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert proxy.state.peak > 2 and errors and proxy.state.served.get("cap")


def test_persistent_failure_marks_the_checkpoint_failed_and_the_next_one_commits(s3):
    proxy, bucket, options = s3
    fs, root = open_s3(f"s3://{bucket}/run", options)
    proxy.add("503", method="PUT", path_contains="step_00000010/", times=-1)
    results, coord = run_ranks(fs, root, world_size=2, steps=15, cfg=fast_cfg(retries=2))
    assert [(r.step, r.status) for r in results[0]] == [(5, "committed"), (10, "failed"), (15, "committed")]
    failed = [o for o in coord.history() if o["status"] == "failed"]
    assert [o["step"] for o in failed] == [10] and "reduce your request rate" in failed[0]["error"]
    assert scan(fs, root).committed == [5, 15]
    assert load_latest(root, fs=fs).step == 15


def test_flipped_byte_in_the_bucket_falls_back_to_the_previous_commit(s3):
    proxy, bucket, options = s3
    fs, root = open_s3(f"s3://{bucket}/run", options)
    run_ranks(fs, root, world_size=2, steps=10, cfg=fast_cfg())
    path = f"{root}/step_00000010/model.pt"
    data = bytearray(fs.cat_file(path))
    data[100] ^= 0x01
    fs.pipe_file(path, bytes(data))
    seen = []
    ck = load_latest(root, fs=fs, on_corrupt=seen.append)
    assert ck.step == 5 and [e.step for e in seen] == [10] and "model.pt" in seen[0].reason


def test_listing_shows_the_documented_layout_and_retention(s3):
    proxy, bucket, options = s3
    fs, root = open_s3(f"s3://{bucket}/exp/run-1", options)
    run_ranks(fs, root, world_size=2, steps=30, cfg=fast_cfg(keep_last=2, keep_every=10))
    fs.invalidate_cache()
    keys = sorted(p[len(bucket) + 1:] for p in fs.find(f"{bucket}/exp"))
    per_step = ["MANIFEST.json", "meta.pt", "model.pt", "optim.pt", "rank_00000.pt", "rank_00001.pt"]
    assert keys == [f"exp/run-1/step_{s:08d}/{n}" for s in (10, 20, 25, 30) for n in per_step]


def test_missing_bucket_is_one_clear_error(s3):
    proxy, bucket, options = s3
    with pytest.raises(CheckpointError) as e:
        check_destination(f"s3://no-such-bucket-{bucket}/x", options)
    assert "cannot write there" in str(e.value) and "\n" not in str(e.value)
    check_destination(f"s3://{bucket}/ok", options)  # a good one passes
