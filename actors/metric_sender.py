"""A rank's side of metrics: buffer on the training thread, ship from a background thread.

`log` only appends to per-key lists, so thousands of keys per step cost the training thread
microseconds. A flusher thread turns the buffers into numpy columns and sends them to the metrics
actor with a per-rank sequence number; the actor applies each sequence number once, so a batch
re-sent after a timeout or an actor restart never shows up twice. While the actor is unreachable,
batches wait in a bounded queue; past the bound the oldest are dropped and counted.

With a relay (the node's, actors/node_relay.py), batches go through it: it hands the node's
batches to the metrics actor together and passes the answer back. A relay that fails or does not
answer within `relay_timeout_s` is skipped for RELAY_BACKOFF_S (for good once it is dead) and the
batch goes straight to the actor: if the relay delivers it after all, its seq is already applied
and it is skipped, so a relay fault neither loses nor doubles a point.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

Columns = dict[str, tuple[np.ndarray, np.ndarray]]
RELAY_BACKOFF_S = 30.0  # after a relay timeout, batches go directly for this long before it is tried again


class MetricSender:
    def __init__(self, metrics_actor, rank: int, *, flush_every_s: float = 1.0, max_pending_points: int = 5_000_000,
                 send_timeout_s: float = 30.0, background: bool = True, flush_points: int = 200_000,
                 relay=None, relay_timeout_s: float | None = None):
        self.actor = metrics_actor
        self.rank = rank
        self.relay = relay
        # as long as a direct call gets: a metrics actor slow under load must not send every rank around
        # the relays (the star again), and a relay adds only half a tick to the actor's own answer time
        self.relay_timeout_s = relay_timeout_s or send_timeout_s
        self.relay_back_at = 0.0  # monotonic time from which a relay that timed out is tried again
        self.relay_fallbacks = 0
        self.flush_every_s = flush_every_s
        self.max_pending_points = max_pending_points
        self.send_timeout_s = send_timeout_s
        self.lock = threading.Lock()  # guards the buffer against the training thread
        self.send_lock = threading.Lock()
        self.buffer: dict[str, tuple[list[int], list[float]]] = {}
        self.pending: collections.deque[tuple[int, Columns, int]] = collections.deque()  # (seq, columns, points)
        self.pending_points = 0
        self.seq = 0
        self.sent_points = 0
        self.dropped_points = 0
        self.step = 0
        self.last_error: str | None = None
        self.flush_points = flush_points
        self.buffered = 0
        self._wake = threading.Event()  # set when the buffer is big: ship now, overlapping training
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metric-sender", daemon=True) if background else None
        if self._thread:
            self._thread.start()

    # --- training thread ----------------------------------------------------------------

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.log(metrics, step=step)

    def log(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        step = self.step if step is None else step
        self.step = max(self.step, step)
        with self.lock:
            buf = self.buffer
            for key, value in metrics.items():
                col = buf.get(key)
                if col is None:
                    col = buf[key] = ([], [])
                col[0].append(step)
                col[1].append(float(value))
            self.buffered += len(metrics)
        if self.buffered >= self.flush_points:
            self._wake.set()

    # --- background ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            if not self._stop.is_set():
                self.flush(wait=True)

    def _take(self) -> None:
        """Move the buffer into the pending queue as one numbered batch of numpy columns."""
        with self.lock:
            buf, self.buffer, self.buffered = self.buffer, {}, 0
        if not buf:
            return
        cols = {k: (np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64)) for k, (s, v) in buf.items()}
        n = sum(len(s) for s, _ in cols.values())
        self.seq += 1
        self.pending.append((self.seq, cols, n))
        self.pending_points += n
        while self.pending_points > self.max_pending_points and len(self.pending) > 1:
            _, _, dropped = self.pending.popleft()
            self.pending_points -= dropped
            self.dropped_points += dropped

    def flush(self, *, wait: bool = True) -> bool:
        """Send everything pending, oldest first. Returns False if the actor could not be reached
        (the batches stay queued and are tried again on the next flush)."""
        with self.send_lock:  # one sender at a time: the flusher thread, or an explicit flush/close
            return self._send(wait)

    def _send(self, wait: bool) -> bool:
        self._take()
        while self.pending:
            seq, cols, n = self.pending[0]
            args = (self.rank, seq, cols, self.dropped_points)
            relay = self.relay if self.relay is not None and time.monotonic() >= self.relay_back_at else None
            if not wait:
                (relay.log_columns if relay is not None else self.actor.log_columns_grouped).remote(*args)
                return True
            if relay is None or not self._deliver(relay.log_columns, args, self.relay_timeout_s, relay=True):
                if not self._deliver(self.actor.log_columns_grouped, args, self.send_timeout_s):
                    return False  # actor gone or restarting, a timeout, a store error: keep it, retry later
            self.pending.popleft()
            self.pending_points -= n
            self.sent_points += n
        return True

    def _deliver(self, method, args: tuple, timeout_s: float, *, relay: bool = False) -> bool:
        import ray

        try:
            ray.get(method.remote(*args), timeout=timeout_s)
            return True
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            if relay:
                self.relay_fallbacks += 1
                if isinstance(e, ray.exceptions.RayTaskError):
                    pass  # the relay passed on the actor's own error: the direct call will tell
                elif isinstance(e, ray.exceptions.ActorDiedError):
                    self.relay = None  # gone with its node or killed: direct from now on
                else:  # a timeout, or unreachable for now
                    self.relay_back_at = time.monotonic() + RELAY_BACKOFF_S
            return False

    def close(self, *, attempts: int = 5, backoff_s: float = 1.0) -> None:
        """Stop the flusher and deliver what is left, retrying a few times (bounded)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=self.send_timeout_s + 5)
        for i in range(attempts):
            if self.flush(wait=True):
                return
            time.sleep(backoff_s * (2**i))
        raise RuntimeError(
            f"rank {self.rank}: could not deliver {self.pending_points} metric points to the metrics actor"
            f" (last error: {self.last_error})"
        )
