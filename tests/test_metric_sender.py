"""Metrics delivery: batched, idempotent, surviving a metrics-actor crash, bounded when it is gone."""

from __future__ import annotations

import numpy as np
import pytest

from actors.metric_sender import MetricSender
from actors.metrics_actor import MetricsActor
from orchestrator.anomaly import AnomalyDetector
from orchestrator.store import Store


def test_same_batch_twice_is_stored_once(tmp_path):
    store = Store(tmp_path)
    cols = {"k": (np.arange(3), np.array([1.0, 2.0, 3.0]))}
    assert store.points.append("r", 0, 0, cols, seq=1) == 3
    assert store.points.append("r", 0, 0, cols, seq=1) == 0  # a re-send after a lost ack
    assert store.points.append("r", 1, 0, cols, seq=1) == 3  # another rank has its own numbers
    assert [p["value"] for p in store.series("r", "k", rank=0)] == [1.0, 2.0, 3.0]


@pytest.mark.ray
def test_actor_crash_mid_run_loses_and_duplicates_nothing(tmp_path, ray_address):
    import ray

    actor = ray.remote(MetricsActor).options(max_restarts=-1, num_cpus=0).remote("run1", str(tmp_path), open_store=Store,
                                                                            detector=AnomalyDetector())
    sender = MetricSender(actor, rank=0, flush_every_s=0.02, send_timeout_s=60)  # the restart may be slow
    keys = [f"layer{i}/grad_norm" for i in range(300)]
    for step in range(60):
        sender.log({k: step + i / 1000 for i, k in enumerate(keys)}, step=step)
        if step == 30:
            sender.flush()
            ray.kill(actor, no_restart=False)  # Ray restarts it; the sender re-sends what was not acknowledged
    sender.close(attempts=10, backoff_s=0.2)
    store = Store(tmp_path)
    assert set(store.metric_keys("run1")) == set(keys)
    for k in (keys[0], keys[-1]):
        pts = store.series("run1", k, rank=0)
        assert [p["step"] for p in pts] == list(range(60))
    (sid, _, _, n), = store.points.find("run1", keys[0])
    assert n == 60  # nothing stored twice, even before de-duplication on read
    assert sender.dropped_points == 0 and sender.sent_points == 60 * 300
    ray.kill(actor, no_restart=True)


@pytest.mark.ray
def test_unreachable_actor_buffers_bounded_then_fails_clearly(tmp_path, ray_address):
    import ray

    actor = ray.remote(MetricsActor).options(num_cpus=0).remote("run2", str(tmp_path), open_store=Store,
                                                                detector=AnomalyDetector())
    ray.get(actor.progress.remote())
    ray.kill(actor, no_restart=True)
    sender = MetricSender(actor, rank=3, flush_every_s=3600, send_timeout_s=2, max_pending_points=1000, background=False)
    for step in range(50):
        sender.log({f"k{i}": 1.0 for i in range(100)}, step=step)
        sender.flush()  # fails: the batch stays queued, bounded
        assert sender.pending_points <= 1000 + 100
    assert sender.dropped_points > 0
    with pytest.raises(RuntimeError, match="rank 3: could not deliver"):
        sender.close(attempts=2, backoff_s=0.01)
