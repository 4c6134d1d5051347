"""The way to one tracking server from one process: a queue of units, one thread sending them.

Every RemoteStore of a process that names the same server (and token) shares one Channel, so
what the process writes reaches the server in the order it was written (a run's create_run
before the driver's beat thread's first beat). The channel sends the queue's head as batches
(ingest_wire.py) numbered 1, 2, 3... under its random client id; the server applies a client's
batches once each and in order. A failed send (no answer, a timeout, 5xx) is retried, the same
batch, with backoff; unreachable for give_up_s, or refused (401/403, a bad batch), the channel
saves what is unsent under $ORCHESTRATOR_HOME/unsent/ (the batches as they would have gone, safe
to send again) and every later call raises one line naming the server.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import http.client
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from common.errors import StoreError, StoreFull
from orchestrator.ingest_wire import CONTENT_TYPE, encode

TOKEN_ENV = "ORCHESTRATOR_TOKEN"
GIVE_UP_S = 300.0  # unreachable this long: stop retrying, save what is unsent
MAX_POINTS = 5_000_000  # points waiting in memory, at most (~80 MB)
MAX_BATCH_BYTES = 8 * 2**20  # a batch holds whole units up to this size (a bigger unit goes alone)
REQUEST_TIMEOUT_S = 60.0
BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_PATH = "/ingest/v1/batch"
READ_PATH = "/ingest/v1/read"


class Transient(Exception):
    """Worth sending again: no answer, a timeout, a busy or restarting server."""


class Unit:
    """What one Store call, or one transaction, wrote: sent whole, applied whole."""

    __slots__ = ("ops", "arrays", "points", "nbytes", "sync", "done")

    def __init__(self):
        self.ops: list[dict] = []
        self.arrays: list[np.ndarray] = []
        self.points = 0
        self.nbytes = 0
        self.sync = False  # the caller waits until the server has stored it
        self.done = threading.Event()

    def add(self, op: dict, arrays=(), points: int = 0, *, sync: bool = False) -> None:
        self.ops.append(op)
        self.arrays.extend(arrays)
        self.points += points
        self.nbytes += 16 * points + 256
        self.sync |= sync


def say_to_stderr(line: str) -> None:
    print(f"orchestrator: warning: {line}", file=sys.stderr, flush=True)


class Channel:
    def __init__(self, scheme: str, host: str, port: int, uri: str, token: str | None, *, give_up_s: float,
                 max_points: int, say):
        self.scheme, self.host, self.port, self.uri, self.token = scheme, host, port, uri, token
        self.give_up_s, self.max_points, self.say = give_up_s, max_points, say
        self.client = uuid.uuid4().hex
        self.users = 0  # open RemoteStores on it
        self.runs: set[str] = set()  # runs written to: told about an outage
        self.refs = itertools.count(1)
        self._cond = threading.Condition()
        self._queue: collections.deque[Unit] = collections.deque()
        self._queued_points = 0
        self._inflight: list[Unit] = []
        self._body: bytes | None = None  # the in-flight batch, exactly as first sent
        self._seq = 0
        self._failed: str | None = None
        self._closing = False
        self._down_since: float | None = None
        self._last_error = ""
        self._local = threading.local()  # an HTTP connection per thread
        self._thread = threading.Thread(target=self._send_loop, name="remote-store", daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)

    @property
    def failed(self) -> str | None:
        return self._failed

    # --- writers ------------------------------------------------------------------------

    def submit(self, unit: Unit) -> None:
        """Queue a unit; a sync one is waited for. Raises once the channel has failed, or when
        the queue is full (StoreFull: the caller keeps its data and sends it again later)."""
        with self._cond:
            self.check()
            if unit.points and self._queued_points + unit.points > self.max_points:
                why = f" ({self._last_error})" if self._last_error else ""
                raise StoreFull(f"tracking server {self.uri}: {self._queued_points:,} points already wait in memory to "
                                f"be sent (at most {self.max_points:,}); the server is slow or unreachable{why}")
            self._queue.append(unit)
            self._queued_points += unit.points
            self._cond.notify_all()
        if unit.sync:
            unit.done.wait()  # set when stored, or when the channel gives up (bounded by give_up_s)
            with self._cond:
                self.check()

    def check(self) -> None:
        if self._failed:
            raise StoreError(self._failed)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored (True), or `timeout` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._inflight) and not self._failed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(1.0 if left is None else min(left, 1.0))
            self.check()
        return True

    def close(self) -> None:
        """Deliver what is queued (bounded by give_up_s), then stop the sending thread."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join(timeout=REQUEST_TIMEOUT_S + 5)
            atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):  # a give-up was said when it happened
            self.close()

    # --- reads ----------------------------------------------------------------------------

    def read(self, body: bytes, *, give_up_s: float | None = None) -> tuple[int, dict]:
        """POST a read, retried while the server is unreachable (up to give_up_s, default the channel's)."""
        give_up_s = self.give_up_s if give_up_s is None else give_up_s
        deadline = time.monotonic() + give_up_s
        for delay in backoff():
            try:
                return self.post(READ_PATH, body, "application/json")
            except Transient as e:
                if time.monotonic() + delay > deadline:
                    raise StoreError(f"tracking server {self.uri} unreachable for {give_up_s:g}s ({e})") from None
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- the sending thread ---------------------------------------------------------------

    def _send_loop(self) -> None:
        delays = backoff()
        while True:
            with self._cond:
                while not self._inflight and not self._queue and not self._closing and not self._failed:
                    self._cond.wait()
                if self._failed or (self._closing and not self._inflight and not self._queue):
                    return
                if not self._inflight:
                    self._form_batch()
                body = self._body
            try:
                status, answer = self.post(BATCH_PATH, body, CONTENT_TYPE)
            except Transient as e:
                if self._outage(str(e)):
                    return
                time.sleep(next(delays))
                continue
            if status != 200:
                self._give_up(refusal(self.uri, status, answer))
                return
            delays = backoff()
            self._delivered()

    def _form_batch(self) -> None:
        """Whole units from the queue's head, up to MAX_BATCH_BYTES (one at least); called locked."""
        units, size = [], 0
        while self._queue and (not units or size + self._queue[0].nbytes <= MAX_BATCH_BYTES):
            u = self._queue.popleft()
            units.append(u)
            size += u.nbytes
        self._seq += 1
        self._inflight = units
        self._body = encode(self.client, self._seq, [u.ops for u in units], [a for u in units for a in u.arrays])

    def _delivered(self) -> None:
        with self._cond:
            for u in self._inflight:
                self._queued_points -= u.points
                u.done.set()
            self._inflight, self._body = [], None
            self._cond.notify_all()
            down, self._down_since = self._down_since, None
        if down is None:
            return
        gone = time.monotonic() - down
        self.say(f"tracking server {self.uri} reachable again after {gone:.0f}s; what waited was delivered")
        for run_id in sorted(self.runs):  # on the record of every run this process writes
            unit = Unit()
            unit.add({"op": "add_event", "ref": f"{self.client}:{next(self.refs)}", "run_id": run_id,
                      "kind": "tracking_outage", "severity": "warning", "step": None, "rank": None,
                      "message": f"the tracking server {self.uri} was unreachable for {gone:.0f}s from "
                                 f"{socket.gethostname()} (pid {os.getpid()}); what was logged meanwhile waited in "
                                 "memory and was delivered",
                      "data": {"seconds": round(gone, 1), "last_error": self._last_error}})
            with contextlib.suppress(StoreError):
                self.submit(unit)

    def _outage(self, error: str) -> bool:
        """A failed send: say so once, give up after give_up_s. True: given up."""
        self._last_error = error
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.say(f"tracking server {self.uri} unreachable ({error}); keeping up to {self.max_points:,} points "
                     f"in memory and retrying for up to {self.give_up_s:g}s")
            return False
        if now - self._down_since < self.give_up_s:
            return False
        self._give_up(f"tracking server {self.uri} unreachable for {now - self._down_since:.0f}s ({error})")
        return True

    def _give_up(self, why: str) -> None:
        """Save every unsent batch (in order, as the server takes them); fail every call from now on."""
        with self._cond:
            units = list(self._inflight)
            batches = [(self._seq, self._body)] if self._inflight else []
            while self._queue:
                self._form_batch()
                units += self._inflight
                batches.append((self._seq, self._body))
            points = self._queued_points
            saved = save_batches(self.client, batches) if batches else None
            if saved:
                why += (f"; {points:,} points and the records not yet sent were saved in {saved}: POST each file there, "
                        f"in name order, to {self.uri}{BATCH_PATH} (the server stores each once)")
            elif batches:
                why += f"; {points:,} points and the records not yet sent could not be saved"
            self._failed = why
            self._inflight, self._body = [], None
            self._cond.notify_all()
        for u in units:  # callers waiting for their unit see the failure
            u.done.set()
        self.say(why)

    # --- HTTP -----------------------------------------------------------------------------

    def post(self, path: str, body: bytes, ctype: str) -> tuple[int, dict]:
        headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
        if self.token:
            headers["X-Token"] = self.token
        for again in (False, True):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None
            if conn is None:
                cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
                conn = self._local.conn = cls(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    self._local.conn = None
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._local.conn = None
                if reused and not again:
                    continue  # a kept-alive connection the server closed while idle: once more on a new one
                raise Transient(reason(e)) from None
        if status in (408, 429) or (status >= 500 and status != 501):
            raise Transient(f"HTTP {status}: {error_of(data)}")
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {"error": data[:200].decode(errors="replace")}
        return status, answer if isinstance(answer, dict) else {"result": answer}


_channels: dict[tuple, Channel] = {}
_channels_lock = threading.Lock()


def acquire(scheme: str, host: str, port: int, uri: str, token: str | None, *, private: bool = False,
            **options) -> Channel:
    """The process's channel to this server with this token (a new one if none is open or it
    failed). private: one of its own (a client of its own to the server, as a process would be)."""
    if private:
        ch = Channel(scheme, host, port, uri, token, **options)
        ch.users = 1
        return ch
    with _channels_lock:
        ch = _channels.get((uri, token))
        if ch is None or ch.failed or ch._closing:
            ch = _channels[(uri, token)] = Channel(scheme, host, port, uri, token, **options)
        ch.users += 1
        return ch


def release(ch: Channel) -> None:
    """One RemoteStore less; the last one delivers what is queued and stops the channel."""
    with _channels_lock:
        ch.users -= 1
        last = ch.users <= 0
        if last and _channels.get((ch.uri, ch.token)) is ch:
            del _channels[(ch.uri, ch.token)]
    if last:
        ch.close()
    else:
        ch.flush()


def backoff():
    """0.1 s, 0.2 s, ... up to 5 s, then 5 s again and again."""
    return itertools.chain(BACKOFF_S, itertools.repeat(BACKOFF_S[-1]))


def reason(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, socket.timeout | TimeoutError):
        return f"no answer within {REQUEST_TIMEOUT_S:g}s"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def error_of(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error"))[:300]
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")


def refusal(uri: str, status: int, answer: dict, what: str = "a batch") -> str:
    said = str(answer.get("error") or "")[:300]
    if status in (401, 403):
        return (f"tracking server {uri} refused this client (HTTP {status}: {said}); set {TOKEN_ENV} to the token "
                "the server was started with")
    return f"tracking server {uri} refused {what} (HTTP {status}: {said})"


def save_batches(client: str, batches: list[tuple[int, bytes]]) -> Path | None:
    from orchestrator.store import home  # late: store.py imports the remote store through open_store

    folder = home() / "unsent"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for seq, body in batches:
            fd = os.open(folder / f"{client}-{seq:09d}.batch", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
    except OSError:
        return None
    return folder
