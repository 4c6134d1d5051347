"""Metric reads for the UI: bucketed over any step range, down to full resolution.

`Store.buckets` covers a whole series; zooming needs the same min/max/first/last buckets over a
step range [lo, hi]. Blocks fully inside the range come from the block summaries (cheap even for
10M points); the partial blocks at the edges and the unsealed tail come from the raw points, so
every bucket is exact. Narrow ranges (fewer steps than RAW_READ_LIMIT) simply read raw points.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from orchestrator.series import (
    RAW_READ_LIMIT,
    S_FIRST_STEP,
    S_LAST_STEP,
    Points,
    bucket_edges,
    bucket_points,
    bucket_summaries,
    merge_buckets,
    to_rows,
)
from orchestrator.ui.params import BadRequest

BIG = 2**62
FLOAT_FIELDS = ("value", "min", "max", "first", "last")


class Segment(NamedTuple):
    """One stored series and the steps of it that count (later attempts and forks override)."""

    sid: int
    n: int
    run_id: str
    rank: int
    lo: int
    hi: int


def segments(store, run_id: str, key: str, rank: int | None = None) -> list[Segment]:
    """Every series that makes up a run's history of `key`: each ancestor up to its fork step, and
    per rank each attempt until the next attempt starts (steps replayed after a restore: the latest wins)."""
    out = []
    for rid, upto in store.lineage(run_id):
        run_hi = BIG if upto is None else upto - 1
        by_rank: dict[int, list[tuple[int, int]]] = {}
        for sid, r, _attempt, n in store.points.find(rid, key):  # ordered by rank, attempt
            if rank is None or r == rank:
                by_rank.setdefault(r, []).append((sid, n))
        for r, items in by_rank.items():
            starts = [(store.points.span(sid) or (BIG, BIG))[0] for sid, _ in items]
            for i, (sid, n) in enumerate(items):
                nxt = min(starts[i + 1:], default=BIG + 1)
                out.append(Segment(sid, n, rid, r, -BIG, min(run_hi, nxt - 1)))
    return out


class RangeReader:
    """Reads buckets of a step range; keeps the block summaries of a few long series in memory.
    Shared by the request threads, each reading through its own `points` (connection)."""

    def __init__(self, cache_size: int = 16):
        self.cache_size = cache_size
        self._summaries: dict[int, tuple[int, np.ndarray, Points]] = {}
        self._lock = threading.Lock()  # guards the dict only, never a read

    def summaries(self, points, seg: Segment) -> tuple[np.ndarray, Points]:
        with self._lock:
            hit = self._summaries.get(seg.sid)
        if hit is None or hit[0] != seg.n:  # the series grew: read again
            summ, tail = points.block_summaries(seg.sid)
            hit = (seg.n, summ, tail)
            with self._lock:
                if len(self._summaries) >= self.cache_size:
                    self._summaries.pop(next(iter(self._summaries)))
                self._summaries[seg.sid] = hit
        return hit[1], hit[2]

    def aggregate(self, points, seg: Segment, lo: int, hi: int, edges: np.ndarray) -> dict | None:
        a, b = max(lo, seg.lo), min(hi, seg.hi)
        if a > b:
            return None
        if seg.n <= RAW_READ_LIMIT or b - a < RAW_READ_LIMIT:
            return bucket_points(points.read(seg.sid, a, b), edges)
        summ, tail = self.summaries(points, seg)
        inside = summ[(summ[:, S_FIRST_STEP] >= a) & (summ[:, S_LAST_STEP] <= b)]
        if not len(inside):
            return bucket_points(points.read(seg.sid, a, b), edges)
        ca, cb = int(inside[0, S_FIRST_STEP]), int(inside[-1, S_LAST_STEP])
        parts = [bucket_summaries(inside, edges)]
        keep = (tail.steps >= ca) & (tail.steps <= cb)
        if keep.any():
            parts.append(bucket_points(Points(tail.steps[keep], tail.values[keep]), edges))
        if a < ca:  # the partial block (and any tail points) before the first whole block
            parts.append(bucket_points(points.read(seg.sid, a, ca - 1), edges))
        if cb < b:
            parts.append(bucket_points(points.read(seg.sid, cb + 1, b), edges))
        return merge_buckets(parts)


def span_of(store, segs: list[Segment]) -> tuple[int, int] | None:
    spans = []
    for s in segs:
        sp = store.points.span(s.sid)
        if sp is not None and max(sp[0], s.lo) <= min(sp[1], s.hi):
            spans.append((max(sp[0], s.lo), min(sp[1], s.hi)))
    if not spans:
        return None
    return min(a for a, _ in spans), max(b for _, b in spans)


def metric(store, reader: RangeReader, run_id: str, key: str, *, buckets: int, rank: int | None = None,
           lo: int | None = None, hi: int | None = None) -> dict:
    """Buckets of a run's own points and, for a fork, of the history it inherited (shared edges)."""
    segs = segments(store, run_id, key, rank)
    ranks = sorted({s.rank for s in segs})
    span = span_of(store, segs)
    result = {"run": run_id, "key": key, "rank": rank, "ranks": ranks, "span": span, "points": [],
              "inherited": [], "lo": lo, "hi": hi, "full": True}
    if span is None:
        return result
    lo = span[0] if lo is None else lo
    hi = span[1] if hi is None else hi
    if hi < lo:
        raise BadRequest(f"empty step range: lo={lo} is above hi={hi} (the run's steps are {span[0]}..{span[1]})")
    edges = safe_edges(lo, hi, buckets)
    own, inherited = [], []
    for s in segs:
        agg = reader.aggregate(store.points, s, lo, hi, edges)
        if agg is not None:
            (own if s.run_id == run_id else inherited).append(agg)
    width = max(1, len(ranks))
    for name, parts in (("points", own), ("inherited", inherited)):
        if parts:
            rows = to_rows(merge_buckets(parts))
            result[name] = [_finite(r) for r in rows]
            result["full"] = result["full"] and all(r["count"] <= width for r in rows)
    result.update(lo=lo, hi=hi)
    return result


def safe_edges(lo: int, hi: int, buckets: int) -> np.ndarray:
    """bucket_edges, also for ranges so wide that span * buckets overflows int64 (lo near -2**62)."""
    span = hi - lo + 1
    if span * (buckets + 1) < 2**63:
        return bucket_edges(lo, hi, buckets)
    buckets = max(1, min(buckets, span))
    return np.array([lo + i * span // buckets for i in range(buckets + 1)], dtype=np.int64)


def _finite(row: dict) -> dict:
    """JSON has no NaN/inf: send them as null (the chart marks them) rather than fail."""
    if all(row[k] is not None and math.isfinite(row[k]) for k in FLOAT_FIELDS):
        return row
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()}


def quick_stats(store, run_id: str, key: str, found: list[tuple[int, int, int, int]],
                read: dict[int, Points] | None = None) -> dict:
    """last / best / mean of a run's own series of `key`, mean over ranks per step.
    Very long series use the lowest rank's block summaries instead of reading every point.
    `read`: series read already (SeriesStore.read_many), by id."""
    if not found:
        return {}
    if is_long(found):
        sid = [f for f in found if f[1] == found[0][1]][-1][0]
        summ, tail = store.points.block_summaries(sid)
        means = summ[:, 6] / np.maximum(summ[:, 7], 1)
        vals = np.concatenate([means, tail.values])
        last = tail.values[-1] if len(tail.values) else summ[-1, 3]
        return _clean({"last": last, "best": _best(key, vals), "mean": np.nanmean(vals)})
    per_rank: dict[int, Points] = {}
    for sid, r, _attempt, _n in found:  # later attempts win where steps repeat
        p = read[sid] if read is not None and sid in read else store.points.read(sid)
        prev = per_rank.get(r)
        if prev is not None and len(p.steps):
            keep = prev.steps < p.steps[0]
            p = Points(np.concatenate([prev.steps[keep], p.steps]), np.concatenate([prev.values[keep], p.values]))
        per_rank[r] = p if len(p.steps) or prev is None else prev
    steps = np.concatenate([p.steps for p in per_rank.values()])
    vals = np.concatenate([p.values for p in per_rank.values()])
    if not len(steps):
        return {}
    uniq, inv = np.unique(steps, return_inverse=True)
    mean = np.bincount(inv, weights=vals) / np.bincount(inv)
    return {**_clean({"last": mean[-1], "best": _best(key, mean), "mean": np.nanmean(mean)}), "last_step": int(uniq[-1])}


def is_long(found: list[tuple[int, int, int, int]]) -> bool:
    """quick_stats reads these series' block summaries, not their points."""
    return sum(n for *_, n in found) > RAW_READ_LIMIT


def _best(key: str, vals: np.ndarray) -> float:
    """The minimum for a loss, the maximum for throughput or accuracy (as `orchestrator compare`)."""
    if np.isnan(vals).all():
        return float("nan")
    return np.nanmax(vals) if "tokens" in key or "acc" in key else np.nanmin(vals)


def _clean(d: dict) -> dict:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in d.items()}
