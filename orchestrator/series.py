"""Columnar metric storage inside the tracking store (SQLite or PostgreSQL: the same rows).

One series per (run, key, rank, attempt). New points land as small "tail" rows (one per batch);
once a series has CHUNK tail points they are merged into sealed chunks of CHUNK points, each
carrying a summary of every BLOCK points (first/last step, first/last/min/max value, sum, count).
A downsampled read of a long series then touches only the summaries, never the raw points, so
every spike survives and a 10M-point series reads in milliseconds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from orchestrator import series_write

CHUNK = 8192
BLOCK = 64
RAW_READ_LIMIT = 262_144  # below this many points, bucket the raw points exactly

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    rank INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    tail_n INTEGER NOT NULL DEFAULT 0,
    n INTEGER NOT NULL DEFAULT 0,
    UNIQUE (run_id, key, rank, attempt)
);
CREATE TABLE IF NOT EXISTS chunks (
    series_id INTEGER NOT NULL,
    sealed INTEGER NOT NULL,
    step_lo INTEGER NOT NULL,
    step_hi INTEGER NOT NULL,
    n INTEGER NOT NULL,
    steps BLOB NOT NULL,
    vals BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_series ON chunks (series_id, sealed, step_lo);
-- apart from the chunks: reading a summary must not walk the overflow pages of the raw points
CREATE TABLE IF NOT EXISTS summaries (
    series_id INTEGER NOT NULL,
    step_lo INTEGER NOT NULL,
    summary BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS summaries_by_series ON summaries (series_id, step_lo);
-- the last batch applied per sender: a re-sent batch is recognised and skipped
CREATE TABLE IF NOT EXISTS ingest (
    run_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (run_id, rank, attempt)
);
"""

# summary columns, one row per BLOCK points
S_FIRST_STEP, S_LAST_STEP, S_FIRST, S_LAST, S_MIN, S_MAX, S_SUM, S_COUNT, S_FINITE = range(9)
S_COLS = 9


@dataclass(frozen=True)
class Points:
    steps: np.ndarray  # int64, ascending
    values: np.ndarray  # float64

    @classmethod
    def empty(cls) -> Points:
        return cls(np.empty(0, np.int64), np.empty(0, np.float64))


def latest_per_step(steps: np.ndarray, vals: np.ndarray) -> Points:
    """Points in write order -> sorted by step, one per step, the last write winning."""
    if len(steps) > 1 and not np.all(steps[1:] > steps[:-1]):  # sealed chunks are sorted already
        order = np.argsort(steps, kind="stable")
        steps, vals = steps[order], vals[order]
    last = np.ones(len(steps), dtype=bool)
    last[:-1] = steps[1:] != steps[:-1]
    return Points(steps[last], vals[last])


def columns(rows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(key, step, value) rows -> {key: (steps, values)}, the shape `SeriesStore.append` takes."""
    grouped: dict[str, tuple[list[int], list[float]]] = {}
    for key, step, value in rows:
        steps, values = grouped.setdefault(key, ([], []))
        steps.append(step)
        values.append(value)
    return {k: (np.array(st, dtype=np.int64), np.array(v, dtype=np.float64)) for k, (st, v) in grouped.items()}


def summarize(steps: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """(ceil(n / BLOCK), S_COLS) float64 summary of consecutive BLOCK-point blocks."""
    starts = np.arange(0, len(vals), BLOCK)
    ends = np.minimum(starts + BLOCK, len(vals)) - 1
    out = np.empty((len(starts), S_COLS), dtype=np.float64)
    out[:, S_FIRST_STEP] = steps[starts]
    out[:, S_LAST_STEP] = steps[ends]
    out[:, S_FIRST] = vals[starts]
    out[:, S_LAST] = vals[ends]
    out[:, S_MIN] = np.fmin.reduceat(vals, starts)  # fmin: a NaN does not hide the real minimum
    out[:, S_MAX] = np.fmax.reduceat(vals, starts)
    ok = np.isfinite(vals)
    out[:, S_SUM] = np.add.reduceat(np.where(ok, vals, 0.0), starts)  # the mean is over finite values only
    out[:, S_COUNT] = ends - starts + 1
    out[:, S_FINITE] = np.add.reduceat(ok.astype(np.float64), starts)
    return out


class SeriesStore:
    def __init__(self, db):
        """db: the store's connection (sqlite3, or store_sql.PgConnection); the tables are made
        by the store (store_schema.py)."""
        self.db = db
        self._ids: dict[tuple, int] = {}  # series ids known to be committed
        self._new_ids: dict[tuple, int] = {}  # created in the open transaction: valid only if it commits
        self._open = False

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction; a nested use joins the open one. The Store's own writes made
        inside it (e.g. events) commit or roll back with the points."""
        if self._open:
            yield
            return
        # IMMEDIATE: take the write lock up front; a deferred transaction that reads first cannot
        # wait for another writer (SQLite answers "database is locked" at once instead).
        # PostgreSQL locks rows as it goes: a plain BEGIN there (store_sql.pg_sql)
        self.db.execute("BEGIN IMMEDIATE")
        self._open, committed = True, False
        try:
            yield
            self.db.execute("COMMIT")
            committed = True
        except BaseException:
            # after SQLITE_FULL (and some I/O errors) SQLite has rolled back already: a second
            # ROLLBACK would fail and hide the real error
            if self.db.in_transaction:
                with contextlib.suppress(Exception):
                    self.db.execute("ROLLBACK")
            raise
        finally:
            self._open = False
            if committed:
                self._ids.update(self._new_ids)
            else:  # ids handed out by the rolled-back transaction will be handed out again
                self._ids.clear()
            self._new_ids.clear()

    def append(self, run_id: str, rank: int, attempt: int, data: dict[str, tuple[np.ndarray, np.ndarray]],
               *, seq: int | None = None) -> int:
        """Add points for many keys of one rank in one transaction (or in the caller's open one).
        Returns the number stored. With `seq` (the sender's batch number), a batch already applied
        is skipped: 0 is returned."""
        return self.append_many([(run_id, rank, attempt, data, seq)])[0]

    def append_many(self, batches: list[tuple]) -> list[int]:
        """append() of many batches (run_id, rank, attempt, data, seq), e.g. a tick of every rank,
        in one transaction and a handful of statements (series_write.py); the points stored of each."""
        return series_write.append_many(self, batches, chunk=CHUNK)

    def last_seqs(self, senders) -> dict[tuple[str, int, int], int]:
        """The last batch number applied of each (run_id, rank, attempt) that has one."""
        return series_write.last_seqs(self.db, senders)

    def _seal(self, sid: int) -> int:
        """Merge a series' tail rows into sealed CHUNK-point chunks; a remainder stays as one tail
        row, whose length is returned (the caller writes it to the series' tail_n)."""
        rows = self.db.execute(
            "SELECT rowid, steps, vals FROM chunks WHERE series_id = ? AND sealed = 0 ORDER BY rowid", (sid,)
        ).fetchall()
        steps = np.concatenate([np.frombuffer(r[1], dtype="<i8") for r in rows])
        vals = np.concatenate([np.frombuffer(r[2], dtype="<f8") for r in rows])
        order = np.argsort(steps, kind="stable")
        steps, vals = steps[order], vals[order]
        self.db.execute(
            f"DELETE FROM chunks WHERE rowid IN ({','.join('?' * len(rows))})", [r[0] for r in rows]
        )
        cut = len(steps) // CHUNK * CHUNK
        for lo in range(0, cut, CHUNK):
            s, v = steps[lo : lo + CHUNK], vals[lo : lo + CHUNK]
            self.db.execute(
                "INSERT INTO chunks (series_id, sealed, step_lo, step_hi, n, steps, vals) VALUES (?, 1, ?, ?, ?, ?, ?)",
                (sid, int(s[0]), int(s[-1]), len(s), s.tobytes(), v.tobytes()),
            )
            self.db.execute(
                "INSERT INTO summaries (series_id, step_lo, summary) VALUES (?, ?, ?)",
                (sid, int(s[0]), summarize(s, v).tobytes()),
            )
        rest_s, rest_v = steps[cut:], vals[cut:]
        if len(rest_s):
            self.db.execute(
                "INSERT INTO chunks (series_id, sealed, step_lo, step_hi, n, steps, vals) VALUES (?, 0, ?, ?, ?, ?, ?)",
                (sid, int(rest_s[0]), int(rest_s[-1]), len(rest_s), rest_s.tobytes(), rest_v.tobytes()),
            )
        return len(rest_s)

    # --- reading ------------------------------------------------------------------------

    def find(self, run_id: str, key: str) -> list[tuple[int, int, int, int]]:
        """(series id, rank, attempt, n) for every series of a key."""
        sql = "SELECT id, rank, attempt, n FROM series WHERE run_id = ? AND key = ? ORDER BY rank, attempt"
        return self.db.execute(sql, (run_id, key)).fetchall()

    def keys(self, run_id: str) -> list[str]:
        sql = "SELECT DISTINCT key FROM series WHERE run_id = ? ORDER BY key"
        return [r[0] for r in self.db.execute(sql, (run_id,))]

    def read(self, sid: int, lo: int | None = None, hi: int | None = None) -> Points:
        """Every point of a series (optionally steps lo..hi inclusive), sorted by step; when a step
        was logged twice, the later write wins."""
        lo = -(2**62) if lo is None else lo
        hi = 2**62 if hi is None else hi
        rows = self.db.execute(
            "SELECT steps, vals FROM chunks WHERE series_id = ? AND step_hi >= ? AND step_lo <= ? ORDER BY sealed DESC, rowid",
            (sid, lo, hi),
        ).fetchall()
        if not rows:
            return Points.empty()
        steps = np.concatenate([np.frombuffer(r[0], dtype="<i8") for r in rows])
        vals = np.concatenate([np.frombuffer(r[1], dtype="<f8") for r in rows])
        keep = (steps >= lo) & (steps <= hi)
        return latest_per_step(steps[keep], vals[keep])

    def read_many(self, sids: list[int], per_query: int = 500) -> dict[int, Points]:
        """read(sid) of many whole series, in one query per `per_query` of them: on PostgreSQL each
        query is a round trip, and the runs table reads thousands of short series."""
        found: dict[int, tuple[list, list]] = {}
        unique = list(dict.fromkeys(int(s) for s in sids))
        for i in range(0, len(unique), per_query):
            part = unique[i : i + per_query]
            rows = self.db.execute(
                f"SELECT series_id, steps, vals FROM chunks WHERE series_id IN ({','.join('?' * len(part))}) "
                "ORDER BY series_id, sealed DESC, rowid", part).fetchall()
            for sid, steps, vals in rows:  # per series in read()'s order: the later write wins
                s_, v_ = found.setdefault(sid, ([], []))
                s_.append(np.frombuffer(steps, dtype="<i8"))
                v_.append(np.frombuffer(vals, dtype="<f8"))
        out = {sid: Points.empty() for sid in unique}
        for sid, (s_, v_) in found.items():
            out[sid] = latest_per_step(np.concatenate(s_), np.concatenate(v_))
        return out

    def span(self, sid: int) -> tuple[int, int] | None:
        lo, hi = self.db.execute("SELECT MIN(step_lo), MAX(step_hi) FROM chunks WHERE series_id = ?", (sid,)).fetchone()
        return None if lo is None else (lo, hi)

    def block_summaries(self, sid: int) -> tuple[np.ndarray, Points]:
        """Summaries of the sealed chunks, plus the raw tail points (not yet summarised)."""
        rows = self.db.execute(
            "SELECT summary FROM summaries WHERE series_id = ? ORDER BY step_lo", (sid,)
        ).fetchall()
        summ = (
            np.concatenate([np.frombuffer(r[0], dtype="<f8").reshape(-1, S_COLS) for r in rows])
            if rows else np.empty((0, S_COLS))
        )
        tail_rows = self.db.execute(
            "SELECT steps, vals FROM chunks WHERE series_id = ? AND sealed = 0 ORDER BY rowid", (sid,)
        ).fetchall()
        if tail_rows:
            ts = np.concatenate([np.frombuffer(r[0], dtype="<i8") for r in tail_rows])
            tv = np.concatenate([np.frombuffer(r[1], dtype="<f8") for r in tail_rows])
            order = np.argsort(ts, kind="stable")
            tail = Points(ts[order], tv[order])
        else:
            tail = Points.empty()
        return summ, tail


def bucket_edges(lo: int, hi: int, buckets: int) -> np.ndarray:
    """buckets + 1 integer step edges covering lo..hi; bucket i is [edges[i], edges[i+1])."""
    span = hi - lo + 1
    buckets = max(1, min(buckets, span))
    return lo + (np.arange(buckets + 1, dtype=np.int64) * span) // buckets


def bucket_points(p: Points, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Exact per-bucket first/last/min/max/sum/count of raw points."""
    ok = np.isfinite(p.values)
    return _reduce(np.searchsorted(edges, p.steps, side="right") - 1, len(edges) - 1,
                   p.steps, p.steps, p.values, p.values, p.values, p.values,
                   np.where(ok, p.values, 0.0), np.ones(len(p.steps)), ok.astype(np.float64))


def bucket_summaries(summ: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Per-bucket aggregates from block summaries; a block belongs to the bucket of its first step."""
    idx = np.searchsorted(edges, summ[:, S_FIRST_STEP].astype(np.int64), side="right") - 1
    return _reduce(idx, len(edges) - 1, summ[:, S_FIRST_STEP].astype(np.int64), summ[:, S_LAST_STEP].astype(np.int64),
                   summ[:, S_FIRST], summ[:, S_LAST], summ[:, S_MIN], summ[:, S_MAX], summ[:, S_SUM], summ[:, S_COUNT],
                   summ[:, S_FINITE])


def _reduce(idx, nb, first_step, last_step, first, last, mn, mx, sm, cnt, fin) -> dict[str, np.ndarray]:
    idx = np.clip(idx, 0, nb - 1)
    if len(idx) > 1 and np.any(idx[1:] < idx[:-1]):  # out-of-order input: group by bucket, keep order inside
        order = np.argsort(idx, kind="stable")
        idx, first_step, last_step, first, last, mn, mx, sm, cnt, fin = (
            a[order] for a in (idx, first_step, last_step, first, last, mn, mx, sm, cnt, fin)
        )
    out = {
        "count": np.zeros(nb),
        "finite": np.zeros(nb),
        "sum": np.zeros(nb),
        "min": np.full(nb, np.inf),
        "max": np.full(nb, -np.inf),
        "step": np.full(nb, np.iinfo(np.int64).max),
        "last_step": np.full(nb, np.iinfo(np.int64).min),
        "first": np.full(nb, np.nan),
        "last": np.full(nb, np.nan),
    }
    if len(idx) == 0:
        return out
    # idx is sorted, so each bucket is one contiguous run: reduceat per run, no per-element scatter
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    ends = np.r_[starts[1:], len(idx)] - 1
    present = idx[starts]
    out["count"][present] = np.add.reduceat(cnt, starts)
    out["finite"][present] = np.add.reduceat(fin, starts)
    out["sum"][present] = np.add.reduceat(sm, starts)
    out["min"][present] = np.fmin.reduceat(mn, starts)
    out["max"][present] = np.fmax.reduceat(mx, starts)
    out["step"][present] = first_step[starts]
    out["last_step"][present] = last_step[ends]
    out["first"][present] = first[starts]
    out["last"][present] = last[ends]
    return out


def merge_buckets(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-bucket aggregates of consecutive pieces (e.g. sealed summaries + tail)."""
    out = {k: v.copy() for k, v in parts[0].items()}
    for p in parts[1:]:
        out["count"] += p["count"]
        out["finite"] += p["finite"]
        out["sum"] += p["sum"]
        out["min"] = np.fmin(out["min"], p["min"])
        out["max"] = np.fmax(out["max"], p["max"])
        out["step"] = np.minimum(out["step"], p["step"])
        out["last_step"] = np.maximum(out["last_step"], p["last_step"])
        take_first = np.isnan(out["first"])
        out["first"] = np.where(take_first, p["first"], out["first"])
        out["last"] = np.where(np.isnan(p["last"]), out["last"], p["last"])
    return out


def aggregate(store: SeriesStore, sid: int, n_points: int, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Per-bucket first/last/min/max/sum/count of one series: exact from the raw points for short
    series, from the block summaries (plus the raw tail) for long ones."""
    if n_points <= RAW_READ_LIMIT:
        return bucket_points(store.read(sid), edges)
    summ, tail = store.block_summaries(sid)
    parts = [bucket_summaries(summ, edges)]
    if len(tail.steps):
        parts.append(bucket_points(tail, edges))
    return merge_buckets(parts)


def downsample(store: SeriesStore, sids: list[tuple[int, int]], buckets: int) -> list[dict]:
    """At most `buckets` points over one or more series (e.g. every rank of a key), sharing bucket
    edges; each point keeps the mean, min, max, first and last of its bucket."""
    spans = [store.span(sid) for sid, _ in sids]
    spans = [sp for sp in spans if sp is not None]
    if not spans:
        return []
    edges = bucket_edges(min(lo for lo, _ in spans), max(hi for _, hi in spans), buckets)
    return to_rows(merge_buckets([aggregate(store, sid, n, edges) for sid, n in sids]))


def to_rows(agg: dict[str, np.ndarray]) -> list[dict]:
    rows = []
    for i in np.flatnonzero(agg["count"] > 0):
        rows.append({
            "step": int(agg["step"][i]),
            "last_step": int(agg["last_step"][i]),
            "value": float(agg["sum"][i] / agg["finite"][i]) if agg["finite"][i] else None,  # None: nothing finite
            "min": float(agg["min"][i]),
            "max": float(agg["max"][i]),
            "first": float(agg["first"][i]),
            "last": float(agg["last"][i]),
            "count": int(agg["count"][i]),
        })
    return rows
