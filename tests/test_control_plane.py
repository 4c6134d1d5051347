"""The control plane with many ranks (bench/control_plane.py, small): 64 simulated ranks (asyncio
tasks making the actor calls real ranks' side threads make) against the real health monitor,
metrics actor + store and checkpoint coordinator, and the real watchdog; one rank freezes.
Nothing is dropped, the frozen rank is named, the write cap holds. (Speed is the bench's job.)"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


def test_64_ranks_nothing_dropped_frozen_rank_named_cap_respected(ray_address, tmp_path):
    import ray

    sys.path.insert(0, str(REPO / "bench"))
    import control_plane

    node = ray.get_runtime_context().get_node_id()
    out = control_plane.run(64, [node, node], root=str(tmp_path), duration_s=15, ckpt_every=4, seed=3)

    assert out["points_sent"] > 64 * 50 and out["points_stored"] == out["points_sent"], out
    assert out["points_acked"] == out["points_sent"] and out["points_dropped"] == 0 and not out["unsent"], out
    assert out["frozen_rank_named_s"] is not None and not out["false_stalls"], out  # named, and no one else first
    assert out["slot_writes"] >= 64 and out["write_errors"] == 0, out
    assert 1 <= out["slots_peak"] <= out["slot_cap"] == 2, out  # one node: its per-node cap binds
    assert out["slots_peak_coordinator"] <= out["slot_cap"], out


# --- the slot queue behind it, no Ray -------------------------------------------------------------


def test_queued_slot_requests_are_granted_oldest_first_and_a_full_node_does_not_block_others():
    from checkpointing.slots import SlotTable

    t = SlotTable(max_global=2, per_node=1, lease_s=60)
    a = t.acquire(0, "n1")
    first, second, third = t.wait(1, "n1"), t.wait(2, "n1"), t.wait(3, "n2")
    assert t.serve() == [(third, 2)]  # n1 is full: n2's later request goes first
    assert t.acquire(9, "n3") is None  # the run is full
    assert t.release(a)
    t.release(2)
    assert [ticket for ticket, _ in t.serve()] == [first]  # one per node: the oldest n1 request only
    assert t.waiting() == 1 and t.drop_waiting(2) == [second] and t.waiting() == 0


def test_a_one_off_acquire_does_not_jump_the_queue():
    from checkpointing.slots import SlotTable

    t = SlotTable(max_global=1, per_node=1, lease_s=60)
    slot = t.acquire(0, "n")
    ticket = t.wait(1, "n")
    t.release(slot)
    assert t.acquire(2, "n") is None  # the queued request could take the free slot
    assert t.serve() == [(ticket, 2)] and not t.cancel(ticket)


def test_the_coordinator_hands_a_freed_slot_to_the_waiting_call_and_times_out_the_rest():
    import asyncio

    from actors.checkpoint_coordinator import CheckpointCoordinator

    async def scenario():
        c = CheckpointCoordinator("r", "x", 3, max_concurrent_writes=1, per_node_writes=1, slot_lease_s=60)
        held = await c.acquire_wait(0, "n", 1.0)
        waiting = asyncio.ensure_future(c.acquire_wait(1, "n", 30.0))
        late = asyncio.ensure_future(c.acquire_wait(2, "n", 0.2))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        c.release(held)
        got = await asyncio.wait_for(waiting, 5)
        assert got is not None and got != held and await late is None  # timed out behind it: None
        assert c.stats()["in_flight"] == 1 and c.stats()["waiting"] == 0
        dead = asyncio.ensure_future(c.acquire_wait(5, "n", 30.0))
        await asyncio.sleep(0.05)
        assert c.release_rank(5) == 0 and await asyncio.wait_for(dead, 5) is None  # a restarted rank's wait ends

    asyncio.run(scenario())


# --- the batch calls a node's aggregator makes (bench/control_plane.py --aggregate), no Ray --------


def test_beat_many_keeps_each_ranks_latest_heartbeat_and_answers_the_dump_request():
    from actors.health import HealthMonitor

    m = HealthMonitor()
    m.request_dumps()
    assert m.beat_many([{"rank": 0, "step": 1, "time": 1.0}, {"rank": 1, "step": 1, "time": 1.0}]) == 1
    m.beat_many([{"rank": 1, "step": 2, "time": 2.0}])
    beats = m.snapshot()
    assert sorted(beats) == [0, 1] and beats[1]["step"] == 2 and beats[0]["step"] == 1


def test_log_columns_many_stores_every_ranks_batch_once_and_fails_only_what_cannot_be_stored(tmp_path):
    import asyncio

    import numpy as np

    from actors.metrics_actor import MetricsActor
    from orchestrator.anomaly import AnomalyDetector
    from orchestrator.store import Store

    store = Store(tmp_path)
    store.create_run(run_id="r", name="cp", config={}, git_commit=None, host="h", command="c", world_size=3)
    actor = MetricsActor("r", str(tmp_path), open_store=Store, detector=AnomalyDetector())
    cols = lambda step: {"train/loss": (np.array([step]), np.array([1.0]))}  # noqa: E731
    batches = [(rank, 1, cols(0), 0) for rank in range(3)]

    assert asyncio.run(actor.log_columns_many(batches)) == [1, 1, 1]
    assert asyncio.run(actor.log_columns_many(batches)) == [0, 0, 0]  # sent again: skipped by seq
    bad = [(0, 2, cols(1), 0), (1, 2, {"train/loss": "not columns"}, 0)]
    with pytest.raises(ValueError):  # its columns cannot be unpacked: its error comes back to the caller
        asyncio.run(actor.log_columns_many(bad))
    assert asyncio.run(actor.log_columns_many(bad[:1])) == [0]  # the good one went in despite its neighbour
    stored = {rank: n for _, rank, _, n in store.points.find("r", "train/loss")}
    assert stored == {0: 2, 1: 1, 2: 1}, stored
    actor.close()
    store.close()
