"""Points that arrive from outside the training loop (the MLflow API, TensorBoard imports).

They differ from a rank's points in two ways, and both are kept:

- each point has a wall time. Wall times are stored as a float64 series (unix seconds) beside
  the values, with the same key, rank, attempt and steps, under the companion id
  `RUN#wall_time` (`times_id`), so the series store needs no new column and `metric_keys`,
  `runs` and the charts never see them;
- a step may be logged more than once (MLflow's `log_metric` without a step logs every value
  at step 0; a restarted TensorBoard writer replays steps). The k-th value logged at a step goes
  to attempt k, so nothing is overwritten: reads resolve a step to its latest value, as they do
  for steps replayed after a restore, and `export` and MLflow's metric history give every value.

Everything goes through `store.points` (append/find/read/span) and `store.transaction()`, which
every store backend provides. MLflow's rank is 0.
"""

from __future__ import annotations

import secrets
import threading
import time

import numpy as np

from orchestrator.series import Points

RANK = 0
TIMES_SUFFIX = "#wall_time"
NEXT_CACHE_LIMIT = 1_000_000  # (run, key, step) entries remembered for out-of-order steps


def new_run_id(name: str) -> str:
    """An id like launch's (name, time, random), for runs made by the MLflow API or an import."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40]
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def times_id(run_id: str) -> str:
    """The series run id under which a run's wall times are kept."""
    return run_id + TIMES_SUFFIX


class PointWriter:
    """Appends rows of (key, step, value, wall time) to runs, choosing each row's attempt.

    One writer per store; it remembers, per (run, key), the highest step of attempt 0, so a
    stream of rising steps (the usual case) never reads the store. Thread-safe.
    """

    def __init__(self, store):
        self.store = store
        self._lock = threading.Lock()
        self._top: dict[tuple[str, str], int | None] = {}  # highest step stored in attempt 0
        self._next: dict[tuple[str, str, int], int] = {}  # next free attempt of a step seen out of order

    def write(self, run_id: str, rows: list[tuple[str, int, float, float]]) -> int:
        """Store rows (key, step, value, wall time in seconds; NaN when unknown). Returns the count."""
        by_key: dict[str, list[tuple[int, float, float]]] = {}
        for key, step, value, wall in rows:
            by_key.setdefault(key, []).append((step, value, wall))
        with self._lock:
            batches: dict[int, tuple[dict, dict]] = {}  # attempt -> ({key: values}, {key: times})
            for key, items in by_key.items():
                steps = np.array([s for s, _, _ in items], dtype=np.int64)
                values = np.array([v for _, v, _ in items], dtype=np.float64)
                walls = np.array([w for _, _, w in items], dtype=np.float64)
                attempts = self._attempts(run_id, key, steps)
                for attempt in np.unique(attempts).tolist():
                    pick = attempts == attempt
                    vals, times = batches.setdefault(attempt, ({}, {}))
                    vals[key] = (steps[pick], values[pick])
                    times[key] = (steps[pick], walls[pick])
            try:
                with self.store.transaction():
                    for attempt, (vals, times) in sorted(batches.items()):
                        self.store.points.append(run_id, RANK, attempt, vals)
                        self.store.points.append(times_id(run_id), RANK, attempt, times)
            except BaseException:
                self._forget(run_id)  # what was assumed about this batch did not happen
                raise
            if len(self._next) > NEXT_CACHE_LIMIT:
                self._next.clear()  # the store holds the truth; it is read again when needed
        return len(rows)

    def _forget(self, run_id: str) -> None:
        for k in [k for k in self._top if k[0] == run_id]:
            del self._top[k]
        for k in [k for k in self._next if k[0] == run_id]:
            del self._next[k]

    def _attempts(self, run_id: str, key: str, steps: np.ndarray) -> np.ndarray:
        rk = (run_id, key)
        if rk not in self._top:
            self._top[rk] = self._stored_top(run_id, key)
        top = self._top[rk]
        out = np.zeros(len(steps), dtype=np.int64)
        if len(steps) == 0:
            return out
        if (top is None or steps[0] > top) and np.all(steps[1:] > steps[:-1]):  # rising, all new
            self._top[rk] = int(steps[-1])
            return out
        for i, step in enumerate(steps.tolist()):
            if top is None or step > top:
                top = step
                attempt = 0
            else:
                attempt = self._next.get((run_id, key, step))
                if attempt is None:
                    attempt = self._stored_count(run_id, key, step)
            out[i] = attempt
            self._next[(run_id, key, step)] = attempt + 1
        self._top[rk] = top
        return out

    def _stored_top(self, run_id: str, key: str) -> int | None:
        for sid, rank, attempt, _ in self.store.points.find(run_id, key):
            if rank == RANK and attempt == 0:
                span = self.store.points.span(sid)
                return None if span is None else span[1]
        return None

    def _stored_count(self, run_id: str, key: str, step: int) -> int:
        """How many values the store has at this step (they fill attempts 0..n-1)."""
        return sum(1 for sid, rank, _, _ in self.store.points.find(run_id, key)
                   if rank == RANK and len(self.store.points.read(sid, lo=step, hi=step).steps))


def wall_times(store, run_id: str, key: str, rank: int, attempt: int, steps: np.ndarray) -> np.ndarray:
    """The wall time (unix seconds) of each of these steps of one series; NaN where none is kept."""
    out = np.full(len(steps), np.nan)
    for sid, r, a, _ in store.points.find(times_id(run_id), key):
        if r == rank and a == attempt:
            t = store.points.read(sid)
            if len(t.steps):
                at = np.clip(np.searchsorted(t.steps, steps), 0, len(t.steps) - 1)
                hit = t.steps[at] == steps
                out[hit] = t.values[at[hit]]
    return out


def series_points(store, run_id: str, key: str) -> list[tuple[int, int, Points]]:
    """(rank, attempt, points) of every stored series of a key of the run itself (no inherited
    history), every value kept."""
    return [(rank, attempt, store.points.read(sid)) for sid, rank, attempt, _ in store.points.find(run_id, key)]
