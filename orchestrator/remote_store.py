"""RemoteStore: a run's tracking writes sent to an `orchestrator server` over HTTP
(`tracking.uri: http://host:port`).

It has the Store methods a run calls (the driver, the controller, the metrics actor). Writes are
queued and sent in order by the process's channel to that server (remote_channel.py: batches
applied once each, retried with backoff, saved to disk if the server stays away):

- What one call or one `with store.transaction():` wrote is one unit: never split, applied whole.
- A metrics actor's batch (points with the rank's batch number) waits until the server has stored
  it, so the rank's sender keeps it until then: the actor can crash or be killed without losing it.
  The same batch number again is answered 0 (stored already), here and on the server.
- The queue is bounded; past it, a write raises StoreFull and the caller keeps its data (a rank's
  sender does).
- Reads flush first, so a run reads what it wrote. They are the Store reads a run makes and the
  CLI's read commands (runs, show, metrics, compare, checkpoints, diagnose, logs, export) call,
  answered from a read-only view of the server's store (ui/ingest.py READS; read_wire.py keeps
  NaNs, arrays and long series exact and compact). A store that has neither written nor had a
  read answered gives up a read after FIRST_READ_S (a command against a server that is not
  there: one line soon); after that, reads ride out a server restart as writes do.

The token comes from $ORCHESTRATOR_TOKEN (never from the URI: URIs are printed and stored).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from checkpointing.records import STATUSES as CHECKPOINT_STATUSES
from common.errors import StoreError, UserError
from orchestrator import read_wire, remote_channel
from orchestrator.ingest_wire import dumps, points_op
from orchestrator.remote_channel import (
    BATCH_PATH,
    GIVE_UP_S,
    MAX_POINTS,
    TOKEN_ENV,
    Unit,
    refusal,
    say_to_stderr,
)
from orchestrator.series import Points

__all__ = ["BATCH_PATH", "CheckpointRecordsSender", "RemoteStore", "parse_uri"]
MAX_LINE = 16_384  # as run_logs.MAX_LINE: a runaway line is cut before it travels
FIRST_READ_S = 5.0


class _Unsupported(StoreError, AttributeError):
    """A Store method a RemoteStore lacks: one line at the CLI, False for hasattr()."""


def parse_uri(uri: str) -> tuple[str, str, int]:
    """http(s)://host[:port] -> (scheme, host, port); anything else is one line."""
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError as e:
        raise StoreError(f"tracking server URI {uri!r} does not parse ({e}); expected http://host:port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"tracking server URI {uri!r}: expected http://host:port or https://host:port")
    if parts.username or parts.password:
        raise StoreError(f"tracking server URI {parts.scheme}://{parts.hostname}: put no credentials in it; "
                         f"set {TOKEN_ENV} to the server's token instead")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise StoreError(f"tracking server URI {uri!r}: expected http://host:port with nothing after the port")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


class _Points:
    def __init__(self, owner: RemoteStore):
        self.owner = owner

    def append(self, run_id: str, rank: int, attempt: int, data: dict[str, tuple[np.ndarray, np.ndarray]],
               *, seq: int | None = None) -> int:
        return self.owner._append(run_id, rank, attempt, data, seq)

    # the series reads `export` makes (SeriesStore's, by the server's series ids)
    def keys(self, run_id: str) -> list[str]:
        return self.owner._read("points.keys", run_id=run_id)

    def find(self, run_id: str, key: str) -> list[tuple[int, int, int, int]]:
        return [tuple(row) for row in self.owner._read("points.find", run_id=run_id, key=key)]

    def read(self, sid: int) -> Points:
        return self.owner._read("points.read", sid=int(sid))


class _Logs:
    def __init__(self, owner: RemoteStore):
        self.owner = owner

    def add(self, run_id: str, attempt: int, rank: int, lines: list[tuple[float, str, str]]) -> None:
        self.owner._write({"op": "logs", "run_id": run_id, "attempt": attempt, "rank": rank,
                           "lines": [[float(t), stream, text[:MAX_LINE]] for t, stream, text in lines]})

    def read(self, run_id: str, *, rank: int | None = None, attempt: int | None = None, after: int = 0,
             limit: int = 100_000, tail: int | None = None) -> list[dict[str, Any]]:
        return self.owner._read("logs.read", run_id=run_id, rank=rank, attempt=attempt, after=after, limit=limit,
                                tail=tail)


class CheckpointRecordsSender:
    """The checkpoint coordinator's records (checkpointing/records.py's add and mark_corrupt) sent to
    the server in order with the process's other writes, without waiting: the coordinator's loop
    must not stall on the network. The server upserts them by (run, step), so a repeat is harmless;
    close() delivers what is queued (the coordinator is closed before it is killed)."""

    def __init__(self, store: RemoteStore):
        self.store = store

    def add(self, *, run_id: str, step: int, status: str, bytes: int | None = None, blocked_s: float | None = None,
            upload_s: float | None = None, uri: str | None = None, error: str | None = None) -> None:
        if status not in CHECKPOINT_STATUSES:
            raise ValueError(f"checkpoint status must be one of {CHECKPOINT_STATUSES}, got {status!r}")
        self.store._write({"op": "checkpoint", "run_id": run_id, "step": int(step), "status": status, "bytes": bytes,
                           "blocked_s": blocked_s, "upload_s": upload_s, "uri": uri, "error": error})

    def mark_corrupt(self, *, run_id: str, step: int, uri: str, error: str) -> None:
        self.store._write({"op": "checkpoint_corrupt", "run_id": run_id, "step": int(step), "uri": uri,
                           "error": error})

    def list(self, run_id: str) -> list[dict[str, Any]]:
        return self.store._read("checkpoints.list", run_id=run_id)

    def close(self) -> None:
        self.store.close()


class RemoteStore:
    kind = "http"  # Store's are "sqlite" and "postgresql"
    empty_database = False  # as Store's: the server's store exists

    def __init__(self, uri: str, *, create: bool = True, token: str | None = None, give_up_s: float = GIVE_UP_S,
                 max_points: int = MAX_POINTS, say=None, private: bool = False):
        """create: accepted for open_store's sake (the server's store exists). give_up_s, max_points,
        say(line) (where warnings go; default stderr, which a Ray actor forwards to the driver's
        terminal): for the process's channel to this server, when this store opens it. private: a
        channel of its own, not shared with the process's other stores (benchmarks: one client per
        simulated process)."""
        scheme, host, port = parse_uri(uri)
        self.uri = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        self.path = self.uri  # what the driver prints as "store ..."
        from orchestrator.store import home  # late: store.py imports this module through open_store

        self.root = home()  # local files (diagnostics, default checkpoints) stay on this machine
        token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self._ch = remote_channel.acquire(scheme, host, port, self.uri, token, private=private, give_up_s=give_up_s,
                                          max_points=max_points, say=say or say_to_stderr)
        self.points = _Points(self)
        self.logs = _Logs(self)
        self._sender_seqs: dict[tuple[str, int, int], int] = {}  # ranks' batch numbers stored
        self._local = threading.local()  # the open transaction's unit, per thread
        self._closed = False
        self._reached = False  # a read answered or a write made: later reads wait out an outage as writes do

    def __repr__(self) -> str:
        return f"RemoteStore({self.uri!r})"

    # --- writes ---------------------------------------------------------------------------

    def create_run(self, *, run_id: str, name: str, config: dict, git_commit: str | None, host: str,
                   command: str, world_size: int, parent: str | None = None, fork_step: int | None = None,
                   meta: dict | None = None, tags: dict[str, str] | None = None) -> None:
        self._ch.runs.add(run_id)
        self._write({"op": "create_run", "run_id": run_id, "name": name, "config": config, "git_commit": git_commit,
                     "host": host, "command": command, "world_size": world_size, "parent": parent,
                     "fork_step": fork_step, "meta": meta, "tags": tags})

    def reopen_run(self, run_id: str, *, config: dict) -> None:
        self._ch.runs.add(run_id)
        self._write({"op": "reopen_run", "run_id": run_id, "config": config})

    def update_meta(self, run_id: str, **fields) -> None:
        self._write({"op": "update_meta", "run_id": run_id, "fields": fields})

    def tag(self, run_id: str, key: str, value: str) -> None:
        self._write({"op": "tag", "run_id": run_id, "key": key, "value": value})

    def add_note(self, run_id: str, text: str) -> None:
        self._write({"op": "add_note", "run_id": run_id, "text": text})

    def start_attempt(self, run_id: str, attempt: int, *, resumed_from_step: int | None) -> None:
        self._write({"op": "start_attempt", "run_id": run_id, "attempt": attempt,
                     "resumed_from_step": resumed_from_step})

    def end_attempt(self, run_id: str, attempt: int, status: str, **fields) -> None:
        self._write({"op": "end_attempt", "run_id": run_id, "attempt": attempt, "status": status, "fields": fields})

    def set_recovery(self, run_id: str, attempt: int, recovery_s: float) -> None:
        self._write({"op": "set_recovery", "run_id": run_id, "attempt": attempt, "recovery_s": recovery_s})

    def add_event(self, run_id: str, *, kind: str, severity: str, message: str, step: int | None = None,
                  rank: int | None = None, data: dict | None = None) -> str:
        """Returns the event's reference for update_event_data (the server maps it to its row)."""
        ref = f"{self._ch.client}:{next(self._ch.refs)}"
        self._write({"op": "add_event", "ref": ref, "run_id": run_id, "kind": kind, "severity": severity,
                     "message": message, "step": step, "rank": rank, "data": data})
        return ref

    def update_event_data(self, event_id: int | str, data: dict) -> None:
        self._write({"op": "update_event_data", "event": event_id, "data": data})

    def finish_run(self, run_id: str, status: str, *, error: str | None = None, summary: dict | None = None) -> None:
        self._write({"op": "finish_run", "run_id": run_id, "status": status, "error": error, "summary": summary})

    def driver_beat(self, run_id: str, *, host: str, pid: int | None) -> None:
        self._write({"op": "driver_beat", "run_id": run_id, "host": host, "pid": pid})

    def request_stop(self, run_id: str) -> None:
        self._write({"op": "request_stop", "run_id": run_id})
        self.flush()  # `orchestrator stop` returns once the request is recorded

    def log_metrics(self, run_id: str, points: list[tuple[str, int, int, float, float]], attempt: int = 0) -> None:
        """Row-shaped points (key, step, rank, value, time), as Store.log_metrics."""
        by_rank: dict[int, dict[str, tuple[list, list]]] = {}
        for key, step, rank, value, _ in points:
            steps, vals = by_rank.setdefault(rank, {}).setdefault(key, ([], []))
            steps.append(step)
            vals.append(value)
        with self.transaction():
            for rank, cols in by_rank.items():
                self._append(run_id, rank, attempt, {k: (np.array(s), np.array(v)) for k, (s, v) in cols.items()},
                             None)

    @contextlib.contextmanager
    def transaction(self):
        """Writes inside go to the server as one unit, applied in one transaction there."""
        if getattr(self._local, "unit", None) is not None:
            yield  # nested: joins the open one
            return
        unit = self._local.unit = Unit()
        self._local.seqs = []
        try:
            yield
        finally:
            self._local.unit = None
        if unit.ops:
            self._submit(unit, self._local.seqs)

    def _append(self, run_id: str, rank: int, attempt: int, data, seq: int | None) -> int:
        key = (run_id, int(rank), int(attempt))
        if seq is not None and seq <= self._sender_seqs.get(key, 0):
            return 0  # sent again by a rank whose acknowledgement was lost: stored already
        op, arrays, n = points_op(run_id, rank, attempt, seq, data)
        if n == 0:
            return 0
        self._ch.runs.add(run_id)
        self._write(op, arrays, n, sync=seq is not None, seq=(key, seq) if seq is not None else None)
        return n

    def _write(self, op: dict, arrays=(), points: int = 0, *, sync: bool = False, seq=None) -> None:
        unit = getattr(self._local, "unit", None)
        if unit is None:
            unit = Unit()
            unit.add(op, arrays, points, sync=sync)
            self._submit(unit, [seq] if seq else [])
            return
        unit.add(op, arrays, points, sync=sync)
        if seq:
            self._local.seqs.append(seq)

    def _submit(self, unit: Unit, seqs: list) -> None:
        if self._closed:
            raise StoreError(f"tracking server {self.uri}: this store was closed")
        self._ch.submit(unit)
        self._reached = True  # a run's store: its reads ride out a restart (a CLI's reads-only store gives up soon)
        for key, seq in seqs:  # stored (a unit with batch numbers is waited for): a resend is answered 0
            self._sender_seqs[key] = max(seq, self._sender_seqs.get(key, 0))

    def checkpoint_records(self) -> CheckpointRecordsSender:
        """The checkpoint coordinator's records, on a store of their own (close it after)."""
        return CheckpointRecordsSender(RemoteStore(self.uri, token=self._ch.token))

    # --- reads (what a run reads back, and the CLI's read commands) -------------------------

    def run(self, ref: str) -> dict[str, Any]:
        return self._read("run", ref=ref)

    def has_run(self, run_id: str) -> bool:
        return self._read("has_run", run_id=run_id)

    def runs(self) -> list[dict[str, Any]]:
        return self._read("runs")

    def latest_named(self, name: str) -> dict[str, Any] | None:
        return self._read("latest_named", name=name)

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        return self._read("attempts", run_id=run_id)

    def latest_attempt(self, run_id: str) -> int | None:
        return self._read("latest_attempt", run_id=run_id)

    def stop_requested(self, run_id: str) -> bool:
        return self._read("stop_requested", run_id=run_id)

    def tags(self, run_id: str) -> dict[str, str]:
        return self._read("tags", run_id=run_id)

    def events(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        return self._read("events", run_id=run_id, kind=kind)

    def notes(self, run_id: str) -> list[dict[str, Any]]:
        return self._read("notes", run_id=run_id)

    def metric_keys(self, run_id: str) -> list[str]:
        return self._read("metric_keys", run_id=run_id)

    def ranks(self, run_id: str, key: str) -> list[int]:
        return self._read("ranks", run_id=run_id, key=key)

    def series(self, run_id: str, key: str, *, rank: int | None = None) -> list[dict[str, Any]]:
        return self._read("series", run_id=run_id, key=key, rank=rank)

    def buckets(self, run_id: str, key: str, buckets: int, *, rank: int | None = None) -> list[dict[str, Any]]:
        return self._read("buckets", run_id=run_id, key=key, buckets=int(buckets), rank=rank)

    def _read(self, method: str, **args):
        self.flush()
        give_up_s = self._ch.give_up_s if self._reached else min(FIRST_READ_S, self._ch.give_up_s)
        status, answer = self._ch.read(dumps({"method": method, "args": args}).encode(), give_up_s=give_up_s)
        if status == 404:  # no such run: the server's one line
            raise UserError(answer.get("error") or f"not found on {self.uri}")
        if status != 200:
            raise StoreError(refusal(self.uri, status, answer, what="a read"))
        self._reached = True
        return read_wire.decode(answer["result"])

    def __getattr__(self, name: str):
        # only reached for what this class lacks: say so plainly instead of an AttributeError deep in a command
        if name.startswith("_"):
            raise AttributeError(name)
        raise _Unsupported(f"{name}: the tracking server {self.__dict__.get('uri', '?')} does not offer this; "
                           "name the server's database itself (--store or ORCHESTRATOR_STORE: a SQLite path or "
                           "postgresql://...)")

    # --- the end --------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything written so far is stored (True), or `timeout` passes (False).
        Raises if the channel gave up (the message says where the unsent data went)."""
        return self._ch.flush(timeout)

    def close(self) -> None:
        """Deliver what was written (bounded by give_up_s); the process's last store to this
        server also stops its sending thread."""
        if self._closed:
            return
        self._closed = True
        remote_channel.release(self._ch)
