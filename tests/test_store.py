"""Tracking store: runs, columnar metric series, spike-preserving buckets, reads while writing. No Ray."""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest

from common.errors import UserError
from orchestrator import series
from orchestrator.store import Store, open_store


@pytest.fixture
def store(store_uri):
    """A SQLite store, then a PostgreSQL one: every test here runs on both."""
    s = open_store(store_uri)
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


def test_latest_attempt_wins_where_steps_were_replayed(store):
    make_run(store)
    store.log_metrics("r1", [("k", s, 0, 1.0, 0.0) for s in range(10)], attempt=0)
    store.log_metrics("r1", [("k", s, 0, 2.0, 0.0) for s in range(6, 12)], attempt=1)  # resumed at step 6
    pts = store.series("r1", "k", rank=0)
    assert [p["step"] for p in pts] == list(range(12))
    assert [p["value"] for p in pts] == [1.0] * 6 + [2.0] * 6


def test_buckets_keep_a_single_step_spike(store):
    make_run(store)
    vals = np.ones(10_000)
    vals[7_777] = 1000.0
    store.points.append("r1", 0, 0, {"k": (np.arange(10_000), vals)})
    out = store.buckets("r1", "k", 50, rank=0)
    assert len(out) == 50
    spike = [p for p in out if p["max"] == 1000.0]
    assert len(spike) == 1 and spike[0]["step"] <= 7_777 <= spike[0]["last_step"]
    assert sum(p["count"] for p in out) == 10_000
    assert out[0]["first"] == 1.0 and out[-1]["last"] == 1.0
    agg = store.buckets("r1", "k", 50)  # over ranks: same spike
    assert max(p["max"] for p in agg) == 1000.0 and len(agg) == 50


def test_long_series_is_sealed_and_read_from_summaries(store):
    """Past the raw-read limit, buckets come from block summaries of sealed chunks; spikes, NaNs
    and the tail (not yet sealed) all stay visible."""
    make_run(store)
    n = series.RAW_READ_LIMIT + 3 * series.CHUNK + 123
    steps = np.arange(n)
    vals = np.sin(steps / 1000.0)
    vals[123_456] = 50.0
    vals[n - 5] = -50.0  # lands in the unsealed tail
    vals[200_000] = np.nan
    for lo in range(0, n, 50_000):  # several batches, like a live run
        store.points.append("r1", 0, 0, {"k": (steps[lo : lo + 50_000], vals[lo : lo + 50_000])})
    (sid, _, _, count), = store.points.find("r1", "k")
    assert count == n
    sealed = store.db.execute("SELECT COUNT(*) FROM chunks WHERE series_id = ? AND sealed = 1", (sid,)).fetchone()[0]
    assert sealed == n // series.CHUNK
    out = store.buckets("r1", "k", 1000, rank=0)
    assert len(out) <= 1000 and sum(p["count"] for p in out) == n
    assert max(p["max"] for p in out) == 50.0 and min(p["min"] for p in out) == -50.0
    hit = [p for p in out if p["max"] == 50.0][0]
    assert hit["step"] <= 123_456 <= hit["last_step"]
    full = store.series("r1", "k", rank=0)  # full resolution on request
    assert len(full) == n and full[123_456]["value"] == 50.0


def test_summaries_match_raw_bucketing_when_aligned():
    steps = np.arange(4 * series.BLOCK * 10)
    vals = np.random.default_rng(0).normal(size=len(steps))
    edges = series.bucket_edges(0, len(steps) - 1, 10)  # edges fall on block boundaries
    a = series.bucket_points(series.Points(steps, vals), edges)
    b = series.bucket_summaries(series.summarize(steps, vals), edges)
    for k in ("min", "max", "first", "last", "count", "step", "last_step"):
        assert np.array_equal(a[k], b[k]), k
    assert np.allclose(a["sum"], b["sum"])


def test_reader_sees_rows_while_another_connection_writes(store_uri):
    writer = open_store(store_uri)
    make_run(writer)
    stop = threading.Event()

    def write():
        for step in range(200):
            writer.log_metrics("r1", [("k", step, 0, math.sin(step), 0.0)])
        stop.set()

    t = threading.Thread(target=write)
    t.start()
    reader = open_store(store_uri)
    seen = []
    for _ in range(10_000):  # bounded
        seen.append(len(reader.series("r1", "k", rank=0)) if reader.metric_keys("r1") else 0)
        if stop.is_set():
            break
    t.join(timeout=60)
    assert len(reader.series("r1", "k", rank=0)) == 200
    assert seen == sorted(seen)  # monotone: a reader never sees a partial, shrinking state
    reader.close()
    writer.close()


def test_fork_of_a_fork_inherits_history_up_to_each_fork_step(store):
    make_run(store, "a")
    store.create_run(run_id="b", name="b", config={}, git_commit=None, host="h", command="c", world_size=2,
                     parent="a", fork_step=30)
    store.create_run(run_id="c", name="c", config={}, git_commit=None, host="h", command="c", world_size=2,
                     parent="b", fork_step=50)
    store.points.append("a", 0, 0, {"loss": (np.arange(0, 100), np.full(100, 1.0))})
    store.points.append("b", 0, 0, {"loss": (np.arange(30, 80), np.full(50, 2.0)), "only_b": (np.arange(30, 31), np.ones(1))})
    store.points.append("c", 0, 0, {"loss": (np.arange(50, 60), np.full(10, 3.0))})
    assert store.lineage("c") == [("a", 30), ("b", 50), ("c", None)]
    pts = store.series("c", "loss", rank=0)
    assert [p["step"] for p in pts] == list(range(60))
    assert [p["value"] for p in pts] == [1.0] * 30 + [2.0] * 20 + [3.0] * 10  # nothing of a past 30, of b past 50
    assert "only_b" in store.metric_keys("c") and store.ranks("c", "loss") == [0]
    assert len(store.buckets("c", "loss", 6, rank=0)) == 6
    assert [p["value"] for p in store.series("a", "loss", rank=0)][-1] == 1.0  # the parent is untouched


def test_attempts_are_recorded(store):
    make_run(store)
    store.start_attempt("r1", 0, resumed_from_step=None)
    store.end_attempt("r1", 0, "failed", cause="died", message="rank 1 died", rank=1, node="n1", failed_step=17,
                      steps_lost=7)
    store.start_attempt("r1", 1, resumed_from_step=10)
    store.set_recovery("r1", 1, 4.5)
    store.end_attempt("r1", 1, "completed")
    a0, a1 = store.attempts("r1")
    assert (a0["status"], a0["cause"], a0["rank"], a0["failed_step"], a0["steps_lost"]) == ("failed", "died", 1, 17, 7)
    assert (a1["status"], a1["resumed_from_step"], a1["recovery_s"]) == ("completed", 10, 4.5)


def test_bucket_mean_ignores_non_finite_values(store):
    make_run(store)
    vals = np.array([1.0, np.nan, 3.0, np.nan, np.nan, np.nan])
    store.points.append("r1", 0, 0, {"k": (np.arange(6), vals)})
    first, second = store.buckets("r1", "k", 2, rank=0)
    assert first["value"] == 2.0 and first["count"] == 3  # NaN is counted as a point, not averaged as 0
    assert second["value"] is None and second["count"] == 3
    assert series.summarize(np.arange(6), vals)[0, series.S_FINITE] == 2


def _open_at_once(root: str, start, out) -> None:
    start.wait()
    try:
        s = Store(root)
        s.create_run(run_id=f"r{os.getpid()}", name="r", config={}, git_commit=None, host="h", command="c",
                     world_size=1)
        s.close()
        out.put("ok")
    except Exception as e:  # reported to the test, which shows it
        out.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_fresh_store_at_once_all_get_it(tmp_path):
    """Two drivers starting on one new store: turning it to WAL must wait for the other, not fail
    with 'database is locked' (SQLite does not apply its busy timeout to that change)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    results = []
    for i in range(12):
        start, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(str(tmp_path / str(i)), start, out)) for _ in range(4)]
        for p in procs:
            p.start()
        results += [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    assert len(results) == 48 and set(results) == {"ok"}, [r for r in results if r != "ok"][:3]
    store = Store(tmp_path / "0", create=False)
    assert len(store.runs()) == 4
