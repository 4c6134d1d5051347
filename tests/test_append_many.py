"""SeriesStore.append_many: many ranks' batches in one write, row for row what appending them one
at a time wrote (the old per-key path is kept below as the oracle), on SQLite and PostgreSQL; two
processes appending to one SQLite file; and a batch that cannot be stored failing alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from actors.metrics_actor import MetricsActor
from common.errors import StoreFull
from orchestrator import series
from orchestrator.anomaly import AnomalyDetector
from orchestrator.store import Store, open_store
from tests.conftest import REPO

SMALL_CHUNK = 256  # seals every few batches, so the random runs below cross it many times


def old_append(ss, run_id, rank, attempt, data, seq=None) -> int:
    """The one-batch write append_many replaced (two statements per key): the oracle."""
    db = ss.db
    with ss.transaction():
        if seq is not None:
            row = db.execute("SELECT last_seq FROM ingest WHERE run_id = ? AND rank = ? AND attempt = ?",
                             (run_id, rank, attempt)).fetchone()
            if row is not None and seq <= row[0]:
                return 0
            db.execute("INSERT INTO ingest (run_id, rank, attempt, last_seq) VALUES (?, ?, ?, ?) ON CONFLICT "
                       "(run_id, rank, attempt) DO UPDATE SET last_seq = excluded.last_seq", (run_id, rank, attempt, seq))
        total, full = 0, []
        for key, (steps, vals) in data.items():
            steps = np.ascontiguousarray(steps, dtype="<i8")
            vals = np.ascontiguousarray(vals, dtype="<f8")
            if len(steps) == 0:
                continue
            k = (run_id, key, rank, attempt)
            db.execute("INSERT INTO series (run_id, key, rank, attempt) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING", k)
            sid = db.execute("SELECT id FROM series WHERE run_id = ? AND key = ? AND rank = ? AND attempt = ?",
                             k).fetchone()[0]
            db.execute("INSERT INTO chunks (series_id, sealed, step_lo, step_hi, n, steps, vals) VALUES (?, 0, ?, ?, ?, ?, ?)",
                       (sid, int(steps.min()), int(steps.max()), len(steps), steps.tobytes(), vals.tobytes()))
            tail = db.execute("UPDATE series SET tail_n = tail_n + ?, n = n + ? WHERE id = ? RETURNING tail_n",
                              (len(steps), len(steps), sid)).fetchone()[0]
            total += len(steps)
            if tail >= series.CHUNK:
                full.append(sid)
        for sid in full:
            db.execute("UPDATE series SET tail_n = ? WHERE id = ?", (ss._seal(sid), sid))
    return total


def random_batches(rng: np.random.Generator, count: int) -> list[tuple]:
    """Batches of several runs, ranks and attempts: overlapping and unsorted steps, NaNs, empty
    keys, re-sent batch numbers, batches without one."""
    senders = [(run, rank, attempt) for run in ("a", "b") for rank in range(4) for attempt in (0, 1)]
    seqs = {s: 0 for s in senders}
    progress = {s: 0 for s in senders}
    out = []
    for _ in range(count):
        sender = senders[rng.integers(len(senders))]
        data = {}
        for key in rng.choice([f"k{i}" for i in range(5)], size=rng.integers(1, 5), replace=False):
            n = int(rng.integers(0, 120)) if rng.random() > 0.05 else 0
            lo = max(0, progress[sender] - int(rng.integers(0, 30)))  # overlaps the steps already written
            steps = np.arange(lo, lo + n, dtype=np.int64)
            if rng.random() < 0.2:
                rng.shuffle(steps)
            vals = rng.normal(size=n)
            vals[rng.random(n) < 0.02] = np.nan
            data[str(key)] = (steps, vals)
        progress[sender] += 60
        r = rng.random()
        if r < 0.15:
            seq = None
        elif r < 0.3 and seqs[sender]:
            seq = int(rng.integers(1, seqs[sender] + 1))  # a re-send: skipped
        else:
            seqs[sender] += 1
            seq = seqs[sender]
        out.append((*sender, data, seq))
    return out


def dump(store) -> tuple[dict, list]:
    """Every series' counters, chunk rows (in write order) and summaries, and the batch numbers."""
    db = store.db
    out = {}
    for sid, run, key, rank, attempt, tail_n, n in db.execute(
            "SELECT id, run_id, key, rank, attempt, tail_n, n FROM series").fetchall():
        chunks = [tuple(bytes(x) if isinstance(x, bytes | memoryview) else x for x in row) for row in db.execute(
            "SELECT sealed, step_lo, step_hi, n, steps, vals FROM chunks WHERE series_id = ? ORDER BY rowid", (sid,))]
        summ = [(lo, bytes(s)) for lo, s in db.execute(
            "SELECT step_lo, summary FROM summaries WHERE series_id = ? ORDER BY step_lo", (sid,))]
        out[(run, key, rank, attempt)] = (tail_n, n, chunks, summ)
    seqs = sorted(tuple(r) for r in db.execute("SELECT run_id, rank, attempt, last_seq FROM ingest").fetchall())
    return out, seqs


@pytest.fixture(params=["sqlite", "postgresql"])
def two_stores(request, tmp_path):
    if request.param == "sqlite":
        uris = [str(tmp_path / "one"), str(tmp_path / "many")]
    else:
        server = request.getfixturevalue("pg_server")
        uris = [server.new_database(), server.new_database()]
    stores = [open_store(u) for u in uris]
    yield stores
    for s in stores:
        s.close()


def test_many_batches_at_once_write_what_one_at_a_time_wrote(two_stores, monkeypatch):
    monkeypatch.setattr(series, "CHUNK", SMALL_CHUNK)
    one, many = two_stores
    rng = np.random.default_rng(7)
    batches = random_batches(rng, 400)
    expected = [old_append(one.points, *b) for b in batches]
    got, i = [], 0
    while i < len(batches):  # groups of 1-60: a sender often twice or more in one
        size = int(rng.integers(1, 61))
        got += many.points.append_many(batches[i : i + size])
        i += size
    assert sum(expected) > 10_000 and expected.count(0) > 20  # points went in, and resends were skipped
    assert got == expected
    want, have = dump(one), dump(many)
    assert len(want[0]) > 50 and any(summ for *_, summ in want[0].values())  # many series, some sealed
    assert have == want
    for run, key, rank, attempt in list(want[0])[:20]:  # and the reads agree
        (sid_a, *_), = [r for r in one.points.find(run, key) if r[1:3] == (rank, attempt)]
        (sid_b, *_), = [r for r in many.points.find(run, key) if r[1:3] == (rank, attempt)]
        a, b = one.points.read(sid_a), many.points.read(sid_b)
        assert len(a.steps) and np.array_equal(a.steps, b.steps) and np.array_equal(a.values, b.values, equal_nan=True)


def test_a_batch_sent_twice_in_one_call_is_stored_once(two_stores):
    store = two_stores[0]
    cols = {"loss": (np.arange(5), np.arange(5.0))}
    assert store.points.append_many([("r", 0, 0, cols, 1), ("r", 0, 0, cols, 1), ("r", 1, 0, cols, 1),
                                      ("r", 0, 0, cols, 2)]) == [5, 0, 5, 5]
    assert store.points.append_many([("r", 0, 0, cols, 2), ("r", 0, 0, cols, 3)]) == [0, 5]
    assert store.points.last_seqs([("r", 0, 0), ("r", 1, 0), ("r", 9, 0)]) == {("r", 0, 0): 3, ("r", 1, 0): 1}
    assert [n for *_, n in store.points.find("r", "loss")] == [15, 5]
    assert store.points.append_many([]) == []


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from orchestrator import series
    from orchestrator.store import Store
    series.CHUNK = {chunk}
    root, me = Path(sys.argv[1]), int(sys.argv[2])
    deadline = time.monotonic() + 120
    while not (root / "go").exists() and time.monotonic() < deadline:  # start together
        time.sleep(0.01)
    store = Store(root)
    for i in range({rounds}):
        batches = []
        for rank in range(4):  # the same series from both processes: steps of one parity each
            steps = np.arange(i * 20, i * 20 + 20, dtype=np.int64) * 2 + me
            batches.append(("r", rank, 0, {{"shared": (steps, steps * 0.5)}}, None))
        mine = np.array([i])  # and a sender of its own, with batch numbers
        batches.append(("r", 10 + me, 0, {{"own": (mine, mine * 1.0)}}, i + 1))
        store.points.append_many(batches)
    store.close()
""")


def test_two_processes_appending_to_one_sqlite_file_lose_nothing(tmp_path):
    Store(tmp_path).close()  # the schema, made once
    rounds = 150
    script = WRITER.format(chunk=64, rounds=rounds)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(me)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for me in (0, 1)]
    (tmp_path / "go").touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    store = Store(tmp_path)
    try:
        want = np.arange(rounds * 20 * 2)  # every step of both processes
        for sid, rank, _, n in store.points.find("r", "shared"):
            pts = store.points.read(sid)
            assert len(want) and np.array_equal(pts.steps, want), rank
            assert np.array_equal(pts.values, want * 0.5)
            assert n == len(want)
            tail_n, = store.db.execute("SELECT tail_n FROM series WHERE id = ?", (sid,)).fetchone()
            rows = store.db.execute("SELECT sealed, n FROM chunks WHERE series_id = ?", (sid,)).fetchall()
            assert tail_n == sum(c for s, c in rows if not s)  # the counters saw every write
            assert rows and all(c == 64 for s, c in rows if s)
        assert len(store.points.find("r", "shared")) == 4
        for me in (0, 1):
            (sid, *_), = [r for r in store.points.find("r", "own") if r[1] == 10 + me]
            assert np.array_equal(store.points.read(sid).steps, np.arange(rounds))
        assert store.points.last_seqs([("r", 10, 0), ("r", 11, 0)]) == {("r", 10, 0): rounds, ("r", 11, 0): rounds}
    finally:
        store.close()


def test_a_batch_that_cannot_be_stored_fails_alone_in_a_group(tmp_path):
    actor = MetricsActor("r", str(tmp_path), open_store=Store, detector=AnomalyDetector())
    actor.store.points.append("r", 99, 0, {"warm": (np.arange(3), np.ones(3))})
    pages = actor.store.db.execute("PRAGMA page_count").fetchone()[0]
    actor.store.db.execute(f"PRAGMA max_page_count = {pages + 16}")
    small = [(rank, 1, {"loss": (np.arange(3), np.full(3, float(rank)))}, 0) for rank in range(4)]
    big = (7, 1, {f"key{i}": (np.arange(2000), np.full(2000, 7.0)) for i in range(20)}, 0)  # 640 kB: no room

    async def send(batches):
        return await asyncio.gather(*(actor.log_columns_grouped(*b) for b in batches), return_exceptions=True)

    results = asyncio.run(send([small[0], small[1], big, small[2], small[3]]))
    assert results[:2] + results[3:] == [3, 3, 3, 3]
    assert isinstance(results[2], StoreFull)
    for rank in range(4):  # each small batch in its own series, nothing of the big one anywhere
        assert [p["value"] for p in actor.store.series("r", "loss", rank=rank)] == [float(rank)] * 3
    assert not any(k.startswith("key") for k in actor.store.metric_keys("r"))
    assert [e["kind"] for e in actor.store.events("r")] == ["store_full"]

    actor.store.db.execute("PRAGMA max_page_count = 1000000")
    assert asyncio.run(send([small[0], big])) == [0, 40_000]  # the small one was stored; the big one now is
    assert all(len(actor.store.series("r", f"key{i}", rank=7)) == 2000 for i in range(20))
    actor.close()


def test_metrics_actor_writes_a_group_in_one_append_many(tmp_path, monkeypatch):
    actor = MetricsActor("r", str(tmp_path), open_store=Store, detector=AnomalyDetector())
    calls = []
    real = actor.store.points.append_many
    monkeypatch.setattr(actor.store.points, "append_many", lambda batches: calls.append(len(batches)) or real(batches))

    async def send():
        return await asyncio.gather(*(actor.log_columns_grouped(rank, 1, {"train/loss": (np.array([5]), np.array([1.0 + rank]))})
                                      for rank in range(64)))

    assert asyncio.run(send()) == [1] * 64
    assert calls == [64]  # one write for the 64 ranks' batches
    assert actor.store.ranks("r", "train/loss") == list(range(64))
    actor.close()


def test_the_server_skips_only_what_came_with_a_batch_it_had_stored(tmp_path):
    from orchestrator.ingest_wire import encode, points_op
    from orchestrator.ui.ingest import Ingest

    store = Store(tmp_path)
    store.create_run(run_id="r", name="n", config={}, git_commit=None, host="h", command="c", world_size=2)
    ingest = Ingest(store, lambda: Store(tmp_path))
    try:
        p0, a0, _ = points_op("r", 0, 0, 1, {"loss": (np.arange(3), np.ones(3))})
        assert ingest.batch(encode("client-one", 1, [[p0]], a0)) == (200, {"applied": True, "points": 3})
        # a restarted metrics actor (a new client) sends rank 0's batch again with its alert, then
        # rank 1's new batch, in one unit: the new batch is stored, the old one's alert is not
        alert = {"op": "add_event", "ref": "client-two:1", "run_id": "r", "kind": "loss_spike", "severity": "warning",
                 "message": "m", "step": 2, "rank": 0, "data": None}
        p1, a1, _ = points_op("r", 1, 0, 1, {"loss": (np.arange(3), np.full(3, 2.0))})
        assert ingest.batch(encode("client-two", 1, [[p0, alert, p1]], a0 + a1)) == (200, {"applied": True, "points": 3})
        assert store.events("r") == []
        assert [p["value"] for p in store.series("r", "loss", rank=1)] == [2.0] * 3
        assert [p["value"] for p in store.series("r", "loss", rank=0)] == [1.0] * 3
    finally:
        ingest.close()
        store.close()
