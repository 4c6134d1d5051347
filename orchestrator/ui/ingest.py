"""The server's ingest API: runs (RemoteStore) write their tracking through it.

POST /ingest/v1/batch   a batch (orchestrator/ingest_wire.py); 200 {"applied": bool, "points": n}
POST /ingest/v1/read    {"method": M, "args": {...}}, one of READS; 200 {"result": ...}, 404 no such run

Every batch is checked in the request's thread, then one writer thread applies what is queued in
one store transaction (group commit: many clients' batches share a commit) and answers only once
it is committed. Each client's batch numbers are applied once and in order: the last one applied
per client sits in `ingest_clients`, written in the same transaction as the batch, so a batch sent
again (a lost answer, a restarted server) is acknowledged without being stored twice. Events a
client refers to before it knows their row (add_event, then update_event_data) are found through
`ingest_events`. Both tables are part of the store's schema (store_schema.py) and travel with
`orchestrator store copy`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time

from checkpointing.records import STATUSES as CHECKPOINT_STATUSES
from checkpointing.records import CheckpointRecords
from common.errors import StoreError, StoreFull, UserError
from orchestrator import read_wire
from orchestrator.ingest_wire import BadBatch, decode
from orchestrator.store import STATUSES

log = logging.getLogger(__name__)
COMMIT_WAIT_S = 120.0  # a batch not committed by then: 503, and the client sends it again (harmless)
MAX_GROUP = 256  # batches per commit, at most
FORGET_CLIENTS_S = 30 * 86400

NONE = type(None)
TEXT, TEXT_ = (str,), (str, NONE)  # a trailing _: may be null
INT, INT_ = (int,), (int, NONE)
NUM, NUM_, OBJ, OBJ_, LIST = (int, float), (int, float, NONE), (dict,), (dict, NONE), (list,)
OPS: dict[str, dict[str, tuple]] = {  # op -> its arguments and their JSON types (every one required)
    "create_run": {"run_id": TEXT, "name": TEXT, "config": OBJ, "git_commit": TEXT_, "host": TEXT, "command": TEXT,
                   "world_size": INT, "parent": TEXT_, "fork_step": INT_, "meta": OBJ_, "tags": OBJ_},
    "reopen_run": {"run_id": TEXT, "config": OBJ},
    "update_meta": {"run_id": TEXT, "fields": OBJ},
    "tag": {"run_id": TEXT, "key": TEXT, "value": TEXT},
    "add_note": {"run_id": TEXT, "text": TEXT},
    "start_attempt": {"run_id": TEXT, "attempt": INT, "resumed_from_step": INT_},
    "end_attempt": {"run_id": TEXT, "attempt": INT, "status": TEXT, "fields": OBJ},
    "set_recovery": {"run_id": TEXT, "attempt": INT, "recovery_s": NUM},
    "add_event": {"run_id": TEXT, "ref": TEXT, "kind": TEXT, "severity": TEXT, "message": TEXT, "step": INT_,
                  "rank": INT_, "data": OBJ_},
    "update_event_data": {"event": (int, str), "data": OBJ},
    "finish_run": {"run_id": TEXT, "status": TEXT, "error": TEXT_, "summary": OBJ_},
    "driver_beat": {"run_id": TEXT, "host": TEXT, "pid": INT_},
    "request_stop": {"run_id": TEXT},
    "logs": {"run_id": TEXT, "attempt": INT, "rank": INT, "lines": LIST},
    "points": {"run_id": TEXT, "rank": INT, "attempt": INT, "seq": INT_, "keys": LIST, "data": OBJ},
    "checkpoint": {"run_id": TEXT, "step": INT, "status": TEXT, "bytes": INT_, "blocked_s": NUM_, "upload_s": NUM_,
                   "uri": TEXT_, "error": TEXT_},
    "checkpoint_corrupt": {"run_id": TEXT, "step": INT, "uri": TEXT, "error": TEXT},
}
ATTEMPT_FIELDS = {"cause", "message", "rank", "node", "failed_step", "steps_lost"}
READS = {  # method -> its arguments: what a run reads back, and what the CLI's read commands show
    "run": {"ref": TEXT}, "has_run": {"run_id": TEXT}, "runs": {}, "latest_named": {"name": TEXT},
    "attempts": {"run_id": TEXT}, "latest_attempt": {"run_id": TEXT}, "stop_requested": {"run_id": TEXT},
    "tags": {"run_id": TEXT}, "events": {"run_id": TEXT, "kind": TEXT_},
    "notes": {"run_id": TEXT}, "metric_keys": {"run_id": TEXT}, "ranks": {"run_id": TEXT, "key": TEXT},
    "series": {"run_id": TEXT, "key": TEXT, "rank": INT_},
    "buckets": {"run_id": TEXT, "key": TEXT, "buckets": INT, "rank": INT_},
    "points.keys": {"run_id": TEXT}, "points.find": {"run_id": TEXT, "key": TEXT}, "points.read": {"sid": INT},
    "logs.read": {"run_id": TEXT, "rank": INT_, "attempt": INT_, "after": INT, "limit": INT, "tail": INT_},
    "checkpoints.list": {"run_id": TEXT},
}
MAX_READ_LINES = 1_000_000  # logs.read's limit, at most (one answer stays bounded)


class Refused(Exception):
    """A batch the store must not take: status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_args(what: str, args: dict, spec: dict[str, tuple]) -> None:
    extra = set(args) - set(spec) - {"op"}
    if extra:
        raise BadBatch(f"{what}: unknown argument(s) {', '.join(sorted(extra))[:200]}")
    for name, types in spec.items():
        if name not in args:
            raise BadBatch(f"{what}: missing argument {name!r}")
        value = args[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join("null" if t is NONE else t.__name__ for t in types)
            raise BadBatch(f"{what}: {name} must be {want}, got {type(value).__name__}")


def check_op(op: dict) -> None:
    name = op.get("op")
    if name not in OPS:
        raise BadBatch(f"unknown op {str(name)[:100]!r}; expected one of {', '.join(OPS)}")
    check_args(f"op {name}", op, OPS[name])
    if name == "finish_run" and op["status"] not in STATUSES:
        raise BadBatch(f"op finish_run: status {op['status'][:50]!r}; expected one of {', '.join(STATUSES)}")
    if name == "checkpoint" and op["status"] not in CHECKPOINT_STATUSES:
        raise BadBatch(f"op checkpoint: status {op['status'][:50]!r}; expected one of {', '.join(CHECKPOINT_STATUSES)}")
    if name == "end_attempt" and not set(op["fields"]) <= ATTEMPT_FIELDS:
        raise BadBatch(f"op end_attempt: unknown field(s) {', '.join(sorted(set(op['fields']) - ATTEMPT_FIELDS))}")
    if name == "logs" and not all(isinstance(x, list) and len(x) == 3 and isinstance(x[0], int | float)
                                  and x[1] in ("stdout", "stderr") and isinstance(x[2], str) for x in op["lines"]):
        raise BadBatch("op logs: lines must be [time, \"stdout\"|\"stderr\", text]")


class _Job:
    __slots__ = ("client", "seq", "units", "done", "status", "answer")

    def __init__(self, client: str, seq: int, units: list[list[dict]]):
        self.client, self.seq, self.units = client, seq, units
        self.done = threading.Event()
        self.status, self.answer = 503, {"error": "not applied yet"}

    def finish(self, status: int, answer: dict) -> None:
        self.status, self.answer = status, answer
        self.done.set()


class Ingest:
    def __init__(self, store, open_reader):
        """store: the server's writable Store (this object's writer thread is its only user);
        open_reader(): a read-only Store per read request."""
        self.store = store
        self.open_reader = open_reader
        self.checkpoints = CheckpointRecords(store.db)  # the coordinator's records, in the batch's transaction
        # its tables (store_schema.INGEST_SCHEMA) come with the store's schema version
        # a client silent this long is gone (a process that comes back with a new batch is taken as new)
        store.db.execute("DELETE FROM ingest_clients WHERE time < ?", (time.time() - FORGET_CLIENTS_S,))
        self._known: set[str] = set()  # run ids known to exist (committed)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._thread.start()

    # --- request threads ----------------------------------------------------------------

    def batch(self, body: bytes) -> tuple[int, dict]:
        try:
            client, seq, units = decode(body)
            for unit in units:
                for op in unit:
                    check_op(op)
        except BadBatch as e:
            return 400, {"error": str(e)}
        job = _Job(client, seq, units)
        self._jobs.put(job)
        if not job.done.wait(COMMIT_WAIT_S):
            return 503, {"error": f"the store did not commit the batch within {COMMIT_WAIT_S:g}s; send it again"}
        return job.status, job.answer

    def read(self, body: bytes) -> tuple[int, dict]:
        try:
            req = json.loads(body)
            if not isinstance(req, dict) or req.get("method") not in READS or not isinstance(req.get("args", {}), dict):
                raise BadBatch(f"expected {{\"method\": one of {', '.join(READS)}, \"args\": {{...}}}}")
            args = req.get("args", {})
            check_args(f"read {req['method']}", args, READS[req["method"]])
        except (ValueError, UnicodeDecodeError) as e:
            return 400, {"error": f"read request: {e}"}
        if req["method"] == "buckets" and args["buckets"] < 1:
            return 400, {"error": f"read buckets: buckets must be at least 1, got {args['buckets']}"}
        if req["method"] == "logs.read" and not 0 < args["limit"] <= MAX_READ_LINES:
            return 400, {"error": f"read logs.read: limit must be 1..{MAX_READ_LINES}, got {args['limit']}"}
        reader = self.open_reader()  # read-only: nothing a read names can write
        try:
            return 200, {"result": read_wire.encode(_call(reader, req["method"], args))}
        except UserError as e:  # no such run
            return 404, {"error": str(e)}
        finally:
            reader.close()

    def close(self) -> None:
        """Apply what is queued, then stop the writer."""
        self._jobs.put(None)
        self._thread.join(timeout=COMMIT_WAIT_S)

    # --- the writer thread --------------------------------------------------------------

    def _write_loop(self) -> None:
        stop = False
        while not stop:
            job = self._jobs.get()
            if job is None:
                return
            group = [job]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            self._commit(group)

    def _commit(self, group: list[_Job]) -> None:
        try:
            with self.store.transaction():
                answers = self._apply_group(group)
        except Exception as e:
            self._known.clear()  # a rolled-back create_run may be in it
            if len(group) > 1:  # find the one at fault: the others are applied on their own
                for job in group:
                    self._commit([job])
                return
            group[0].finish(*_failure(e))
            return
        for job, answer in zip(group, answers, strict=True):
            job.finish(200, answer)

    def _apply_group(self, group: list[_Job]) -> list[dict]:
        """The jobs in order, inside the open transaction. Their points go in last, all in one
        SeriesStore.append_many: a tick of every rank of every client is one write."""
        senders = {(op["run_id"], op["rank"], op["attempt"]) for job in group for unit in job.units for op in unit
                   if op["op"] == "points" and op["seq"] is not None}
        last = self.store.points.last_seqs(senders) if senders else {}
        points: list[tuple] = []  # append_many's batches, and the job of each
        owners: list[int] = []
        answers = []
        for j, job in enumerate(group):
            row = self.store.db.execute("SELECT last_seq FROM ingest_clients WHERE client = ?", (job.client,)).fetchone()
            if row is not None and job.seq <= row[0]:
                answers.append({"applied": False, "points": 0})  # applied before: its answer was lost
                continue
            if row is not None and job.seq != row[0] + 1:
                raise Refused(409, f"batch {job.seq} of client {job.client} arrived before batch {row[0] + 1}: "
                                   "send a client's batches in order")
            for unit in job.units:
                for batch in self._apply_unit(unit, last):
                    points.append(batch)
                    owners.append(j)
            self.store.db.execute(
                "INSERT INTO ingest_clients (client, last_seq, time) VALUES (?, ?, ?) ON CONFLICT (client) DO "
                "UPDATE SET last_seq = excluded.last_seq, time = excluded.time", (job.client, job.seq, time.time()))
            answers.append({"applied": True, "points": 0})
        for j, n in zip(owners, self.store.points.append_many(points), strict=True):
            answers[j]["points"] += n
        return answers

    def _apply_unit(self, unit: list[dict], last: dict) -> list[tuple]:
        """Applies a unit's other ops and returns its points batches, to be written with the group's.
        last: the senders' last batch numbers, as they will be once those batches are written."""
        store, batches = self.store, []
        skipping = False  # after a rank's batch applied before: the ops that came with it (its alerts)
        for op in unit:
            name, args = op["op"], {k: v for k, v in op.items() if k != "op"}
            if name != "create_run" and "run_id" in args:
                self._need_run(args["run_id"])
            if name == "points" and args["seq"] is not None and args["keys"]:
                skipping = False  # the next rank's batch: judged on its own
            if skipping:
                continue
            if name == "points":
                sender, seq = (args["run_id"], args["rank"], args["attempt"]), args["seq"]
                if seq is not None and sender in last and seq <= last[sender]:
                    skipping = bool(args["keys"])
                    continue
                if seq is not None:
                    last[sender] = seq
                batches.append((args["run_id"], args["rank"], args["attempt"], args["data"], seq))
            elif name == "logs":
                store.logs.add(args["run_id"], args["attempt"], args["rank"], [tuple(x) for x in args["lines"]])
            elif name == "add_event":
                ref = args.pop("ref")
                run_id = args.pop("run_id")
                event_id = store.add_event(run_id, **args)
                store.db.execute("INSERT INTO ingest_events (ref, event_id) VALUES (?, ?) ON CONFLICT (ref) DO "
                                 "UPDATE SET event_id = excluded.event_id", (ref, event_id))
            elif name == "update_event_data":
                store.update_event_data(self._event_id(args["event"]), args["data"])
            elif name == "checkpoint":
                self.checkpoints.add(**args)
            elif name == "checkpoint_corrupt":
                self.checkpoints.mark_corrupt(**args)
            elif name == "create_run":
                if store.has_run(args["run_id"]):
                    raise Refused(409, f"run {args['run_id']} exists already in the server's store")
                store.create_run(**args)
            else:
                APPLY[name](store, args)
        return batches

    def _need_run(self, run_id: str) -> None:
        if run_id in self._known:
            return
        if not self.store.has_run(run_id):  # 503: another process's create_run may be on its way; try again
            raise Refused(503, f"no run {run_id!r} in the server's store (yet): its create_run has not arrived")
        self._known.add(run_id)

    def _event_id(self, event) -> int:
        if isinstance(event, int):
            return event
        row = self.store.db.execute("SELECT event_id FROM ingest_events WHERE ref = ?", (event,)).fetchone()
        if row is None:
            raise Refused(409, f"update_event_data: no event {event[:100]!r} was recorded")
        return row[0]


APPLY = {  # the other ops: Store methods with the same arguments
    "reopen_run": lambda s, a: s.reopen_run(a["run_id"], config=a["config"]),
    "update_meta": lambda s, a: s.update_meta(a["run_id"], **a["fields"]),
    "tag": lambda s, a: s.tag(a["run_id"], a["key"], a["value"]),
    "add_note": lambda s, a: s.add_note(a["run_id"], a["text"]),
    "start_attempt": lambda s, a: s.start_attempt(a["run_id"], a["attempt"], resumed_from_step=a["resumed_from_step"]),
    "end_attempt": lambda s, a: s.end_attempt(a["run_id"], a["attempt"], a["status"], **a["fields"]),
    "set_recovery": lambda s, a: s.set_recovery(a["run_id"], a["attempt"], a["recovery_s"]),
    "finish_run": lambda s, a: s.finish_run(a["run_id"], a["status"], error=a["error"], summary=a["summary"]),
    "driver_beat": lambda s, a: s.driver_beat(a["run_id"], host=a["host"], pid=a["pid"]),
    "request_stop": lambda s, a: s.request_stop(a["run_id"]),
}


def _call(reader, method: str, args: dict):
    """A whitelisted read on the request's read-only store (dotted: one of its parts)."""
    if method == "checkpoints.list":  # the records table, through the reader's own connection
        return CheckpointRecords(reader.db).list(args["run_id"])
    owner, _, name = method.rpartition(".")
    return getattr(getattr(reader, owner) if owner else reader, name)(**args)


def _failure(e: Exception) -> tuple[int, dict]:
    """A batch that could not be applied -> (status, answer): retryable ones are 5xx."""
    if isinstance(e, Refused):
        return e.status, {"error": str(e)}
    if isinstance(e, StoreFull):
        return 507, {"error": str(e)}
    if isinstance(e, StoreError):
        return 503, {"error": str(e)}
    if type(e).__name__ == "OperationalError":  # e.g. the database is locked by another writer: try again
        return 503, {"error": f"the store is busy: {e}"}
    log.error("ingest: a batch failed", exc_info=e)
    return 500, {"error": f"internal error applying the batch ({type(e).__name__}; the server's log has details)"}
