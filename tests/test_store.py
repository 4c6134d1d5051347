"""Tracking store: runs, metric points, spike-preserving buckets, reads while writing. No Ray."""

from __future__ import annotations

import math
import threading

import pytest

from orchestrator.errors import UserError
from orchestrator.store import Store, bucketize


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    yield s
    s.close()


def make_run(store: Store, run_id: str = "r1", name: str = "n") -> None:
    store.create_run(run_id=run_id, name=name, config={"a": 1}, git_commit=None, host="h", command="c", world_size=2)


def test_run_lifecycle(store):
    make_run(store)
    assert store.run("r1")["status"] == "running"
    store.finish_run("r1", "completed", summary={"last_loss": 1.5})
    run = store.run("r1")
    assert run["status"] == "completed" and run["summary"] == {"last_loss": 1.5} and run["ended_at"]
    assert run["config"] == {"a": 1} and run["parent"] is None and run["fork_step"] is None


def test_run_by_name_and_unknown_run(store):
    make_run(store, "r1", "alpha")
    assert store.run("alpha")["id"] == "r1"
    with pytest.raises(UserError, match="no run 'beta'.*recent runs: r1"):
        store.run("beta")


def test_series_mean_min_max_over_ranks_and_per_rank(store):
    make_run(store)
    store.log_metrics("r1", [("train/loss", 0, 0, 4.0, 0.0), ("train/loss", 0, 1, 6.0, 0.0),
                             ("train/loss", 1, 0, 3.0, 0.0), ("train/loss", 1, 1, 3.5, 0.0)])
    pts = store.series("r1", "train/loss")
    assert pts[0] == {"step": 0, "value": 5.0, "min": 4.0, "max": 6.0, "ranks": 2}
    assert pts[1]["value"] == 3.25
    assert store.series("r1", "train/loss", rank=1) == [{"step": 0, "value": 6.0}, {"step": 1, "value": 3.5}]
    assert store.metric_keys("r1") == ["train/loss"] and store.ranks("r1", "train/loss") == [0, 1]


def test_buckets_keep_a_single_step_spike():
    points = [{"step": s, "value": 1.0} for s in range(10_000)]
    points[7_777]["value"] = 1000.0
    out = bucketize(points, 50)
    assert len(out) == 50
    assert max(p["max"] for p in out) == 1000.0
    spike = [p for p in out if p["max"] == 1000.0]
    assert len(spike) == 1 and spike[0]["step"] <= 7_777 <= spike[0]["last_step"]
    assert sum(p["count"] for p in out) == 10_000
    assert out[0]["first"] == 1.0 and out[-1]["last"] == 1.0


def test_buckets_no_op_when_small():
    points = [{"step": s, "value": float(s)} for s in range(5)]
    assert bucketize(points, 10) == points and bucketize(points, 0) == points


def test_reader_sees_rows_while_another_connection_writes(tmp_path):
    writer = Store(tmp_path)
    make_run(writer)
    stop = threading.Event()

    def write():
        for step in range(200):
            writer.log_metrics("r1", [("k", step, 0, math.sin(step), 0.0)])
        stop.set()

    t = threading.Thread(target=write)
    t.start()
    reader = Store(tmp_path)
    seen = []
    for _ in range(10_000):  # bounded
        seen.append(len(reader.series("r1", "k")))
        if stop.is_set():
            break
    t.join(timeout=60)
    assert len(reader.series("r1", "k")) == 200
    assert seen == sorted(seen)  # monotone: a reader never sees a partial, shrinking state
    reader.close()
    writer.close()
