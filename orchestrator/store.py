"""The tracking store: by default one SQLite file in $ORCHESTRATOR_HOME, in WAL mode so the CLI
can read while a run writes; or a PostgreSQL database a team shares (`open_store(uri)`; the
dialects differ only as store_sql.py says; tables and versions: store_schema.py).

runs:    one row per run (id, name, status, config, timestamps, git commit, host, command line)
series:  metric points per (run, key, rank, attempt), stored in columnar chunks (orchestrator/series.py).
         Run-level values (eval/loss, data/batch_fingerprint) are logged by rank 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import StoreError, StoreFull, UserError
from common.sqlite_wal import use_wal
from orchestrator import store_schema
from orchestrator.run_logs import LogStore
from orchestrator.series import (
    Points,
    SeriesStore,
    bucket_edges,
    bucket_points,
    columns,
    downsample,
    latest_per_step,
    to_rows,
)
from orchestrator.store_schema import RUN_COLUMNS, SCHEMA_VERSION
from orchestrator.store_sql import Location, PgConnection, parse_location

STATUSES = ("running", "completed", "failed", "interrupted", "stopped")  # stored; "lost" is derived (see _run_row)
DRIVER_BEAT_S = 5.0  # how often a live driver says so
LOST_AFTER_S = 60.0  # a running run whose driver has not beaten for this long is lost
ATTEMPT_COLUMNS = ["attempt", "started_at", "resumed_from_step", "ended_at", "status", "cause", "message", "rank",
                   "node", "failed_step", "steps_lost", "recovery_s"]


def driver_gone(host: str | None, pid: int | None, beat: float | None, now: float | None = None) -> bool:
    """A driver that stopped beating LOST_AFTER_S ago, or whose process is gone from this host."""
    if beat is None:
        return False  # a run recorded before drivers beat: nothing to judge by
    if host == socket.gethostname() and pid is not None:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, another user's
            pass
    return (now or time.time()) - float(beat) > LOST_AFTER_S


def home() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_HOME", ".orchestrator")).absolute()


def store_uri(uri: str | None = None) -> str:
    """The store a command uses: `uri` (--store, tracking.uri), else $ORCHESTRATOR_STORE, else the
    SQLite store in $ORCHESTRATOR_HOME (returned as "": the default)."""
    return uri or os.environ.get("ORCHESTRATOR_STORE", "") or ""


def locate(uri: str | None = None) -> Location:
    return parse_location(store_uri(uri), default_root=home())


def open_store(uri: str | None = None, *, create: bool = True):
    """The tracking store named by `uri` (a directory, a SQLite file, postgresql://...,
    http(s)://... for an `orchestrator server`), else $ORCHESTRATOR_STORE, else $ORCHESTRATOR_HOME.
    create=False: a store that does not exist yet is an error, none is made."""
    where = locate(uri)
    if where.kind == "http":
        try:
            from orchestrator.remote_store import RemoteStore  # an `orchestrator server`'s client
        except ImportError:
            raise StoreError(f"store {where.shown}: this orchestrator has no client for an `orchestrator server`;"
                             " name its database (postgresql://...) instead") from None
        return RemoteStore(where.uri, create=create)
    if where.kind == "postgresql":
        return Store.postgres(where.uri, create=create)
    return Store(where.path.parent, create=create, file=where.path.name)


def store_error(e: sqlite3.Error, path: Path) -> Exception:
    """What SQLite reported, as one line naming the store and what to do; others (e.g. locked) unchanged."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
    if code == sqlite3.SQLITE_FULL:
        return StoreFull(f"the tracking store {path} is full: no space left on its disk (or a size limit reached);"
                         " free some, then resume the run")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreError(f"{path} is not a readable tracking store ({e}); move it aside to start a new one,"
                          " or set ORCHESTRATOR_HOME to the directory of another store")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return StoreError(f"cannot write the tracking store {path} ({e}): expected a directory this user can write"
                          " (SQLite keeps store.db-wal and store.db-shm next to store.db)")
    return e


class _Connection(sqlite3.Connection):
    """Every statement's errors become store_error's clear lines (a full disk mid-run included)."""

    path: Path

    def _reraise(self, e: sqlite3.Error):
        err = store_error(e, self.path)
        if err is e:
            raise e
        raise err from e

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.Error as e:
            self._reraise(e)

    def executemany(self, *args):
        try:
            return super().executemany(*args)
        except sqlite3.Error as e:
            self._reraise(e)

    def executescript(self, *args):
        try:
            return super().executescript(*args)
        except sqlite3.Error as e:
            self._reraise(e)


def _private(path: Path) -> None:
    """Make our own store files unreadable to others (stores made before this were 0644)."""
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):  # absent, or not ours to change
            st = os.stat(p)
            if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                os.chmod(p, 0o600)


def open_checkpoint_records(uri: str | None = None):
    """The checkpoints table of the store at `uri`, on a connection of its own (for the
    checkpoint coordinator); for an `orchestrator server`, what sends the records to it."""
    from checkpointing.records import CheckpointRecords

    where = locate(uri)
    if where.kind == "http":
        from orchestrator.remote_store import CheckpointRecordsSender, RemoteStore

        return CheckpointRecordsSender(RemoteStore(where.uri))
    return CheckpointRecords(where.path if where.kind == "sqlite" else PgConnection(where.uri))


def _empty_view(shown: str) -> sqlite3.Connection:
    """The tables of a store, empty and read-only, in memory: what a read of a PostgreSQL database
    without a store in it sees (it must not create one: the database is shared)."""
    db = sqlite3.connect(":memory:", factory=_Connection, isolation_level=None, check_same_thread=False)
    db.path = shown
    store_schema.migrate(db)
    db.execute("PRAGMA query_only = ON")
    return db


class Store:
    kind = "sqlite"
    empty_database = False  # a PostgreSQL database without a store yet, opened to read (see postgres())

    def __init__(self, root: str | os.PathLike | None = None, *, create: bool = True, file: str = "store.db"):
        """A SQLite store: `file` in the directory `root`. create=False (commands that only use
        existing runs): no store at `root` is an error; none is made."""
        self.root = Path(root) if root is not None else home()
        self.path = self.root / file
        self.uri = str(self.path)  # what reopens this store (another process, an actor)
        self._open_files(create)
        try:
            # mode=rw: the file exists by now, and a read must never create one
            self.db = sqlite3.connect(self.path.absolute().as_uri() + "?mode=rw", uri=True, factory=_Connection,
                                      timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise store_error(e, self.path) from e
        self.db.path = self.path
        try:
            use_wal(self.db)
            self.db.execute("PRAGMA synchronous=NORMAL")
            store_schema.prepare(self.db, str(self.path))  # adds what older stores lack
            self._attach()
        except BaseException:
            self.db.close()
            raise

    @classmethod
    def postgres(cls, uri: str, *, create: bool = True) -> Store:
        """A PostgreSQL store. Files that go with runs (diagnostics, crash logs, the default
        checkpoint folder) stay in $ORCHESTRATOR_HOME on this machine."""
        self = cls.__new__(cls)
        self.kind = "postgresql"
        self.db = PgConnection(uri)
        self.uri, self.path, self.root = uri, self.db.shown, home()
        try:
            if not create and store_schema.read_version(self.db) is None:
                # a database nobody has written to yet: a store with no runs; reading makes no tables
                self.db.close()
                self.db, self.empty_database = _empty_view(self.path), True
            else:
                store_schema.prepare(self.db, self.db.shown)
            self._attach()
        except BaseException:
            self.db.close()
            raise
        return self

    def _attach(self) -> None:
        self.points = SeriesStore(self.db)
        self.logs = LogStore(self.db)

    @property
    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def checkpoint_records(self):
        """The checkpoints table of this store, on a connection of its own (close it after)."""
        if self.empty_database:
            from checkpointing.records import CheckpointRecords

            return CheckpointRecords(":memory:")  # none yet, as the empty view says
        return open_checkpoint_records(self.uri)

    def _open_files(self, create: bool) -> None:
        """The directory 0700 and store.db 0600 when made here; SQLite gives -wal and -shm the
        mode of store.db."""
        try:
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"{self.root} is a file; expected a directory for the tracking store"
                                 " (set ORCHESTRATOR_HOME to one)")
            if not create:
                if not self.path.is_file():
                    raise StoreError(f"no tracking store at {self.root}: `orchestrator launch CONFIG.yaml` makes one"
                                     " there, or set ORCHESTRATOR_HOME to the directory of an existing store")
            else:
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as e:
            raise StoreError(f"cannot {'create' if create else 'open'} the tracking store directory {self.root}:"
                             f" {e.strerror}; expected a directory this user can write (set ORCHESTRATOR_HOME to one)"
                             ) from e
        _private(self.path)

    def transaction(self):
        """`with store.transaction():` points and events written inside commit together, or not at all."""
        return self.points.transaction()

    def close(self) -> None:
        self.db.close()

    # --- runs ---------------------------------------------------------------------------

    def create_run(self, *, run_id: str, name: str, config: dict, git_commit: str | None, host: str,
                   command: str, world_size: int, parent: str | None = None, fork_step: int | None = None,
                   meta: dict | None = None, tags: dict[str, str] | None = None) -> None:
        self.db.execute(
            "INSERT INTO runs (id, name, status, parent, fork_step, config, created_at, git_commit, host, command,"
            " world_size, meta) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, name, parent, fork_step, json.dumps(config), time.time(), git_commit, host, command, world_size,
             json.dumps(meta or {})),
        )
        for key, value in (tags or {}).items():
            self.tag(run_id, key, value)

    def reopen_run(self, run_id: str, *, config: dict) -> None:
        """A resumed run is running again, with the config it resumes under."""
        self.db.execute(
            "UPDATE runs SET status = 'running', ended_at = NULL, error = NULL, stop_requested = NULL, config = ?"
            " WHERE id = ?",
            (json.dumps(config), run_id),
        )

    def update_meta(self, run_id: str, **fields) -> None:
        """Merge fields into a run's metadata (e.g. worker hosts, known only after start)."""
        row = self.db.execute("SELECT meta FROM runs WHERE id = ?", (run_id,)).fetchone()
        meta = {**json.loads(row[0] or "{}"), **fields}
        self.db.execute("UPDATE runs SET meta = ? WHERE id = ?", (json.dumps(meta), run_id))

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO tags (run_id, key, value) VALUES (?, ?, ?) ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
            (run_id, key, value),
        )

    def tags(self, run_id: str) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM tags WHERE run_id = ? ORDER BY key", (run_id,)).fetchall())

    def add_note(self, run_id: str, text: str) -> None:
        self.db.execute("INSERT INTO notes (run_id, time, text) VALUES (?, ?, ?)", (run_id, time.time(), text))

    def notes(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT time, text FROM notes WHERE run_id = ? ORDER BY time", (run_id,)).fetchall()
        return [{"time": t, "text": x} for t, x in rows]

    # --- attempts (one per start of the worker group) ------------------------------------

    def start_attempt(self, run_id: str, attempt: int, *, resumed_from_step: int | None) -> None:
        self.db.execute(
            "INSERT INTO attempts (run_id, attempt, started_at, resumed_from_step) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (run_id, attempt) DO UPDATE SET started_at = excluded.started_at,"
            " resumed_from_step = excluded.resumed_from_step, "
            + ", ".join(f"{c} = NULL" for c in ATTEMPT_COLUMNS[3:]),  # a restarted attempt starts over
            (run_id, attempt, time.time(), resumed_from_step),
        )

    def end_attempt(self, run_id: str, attempt: int, status: str, **fields) -> None:
        """status: completed | failed | interrupted; fields: cause, message, rank, node, failed_step, steps_lost."""
        cols = ["ended_at", "status", *fields]
        self.db.execute(
            f"UPDATE attempts SET {', '.join(c + ' = ?' for c in cols)} WHERE run_id = ? AND attempt = ?",
            (time.time(), status, *fields.values(), run_id, attempt),
        )

    def set_recovery(self, run_id: str, attempt: int, recovery_s: float) -> None:
        """Seconds from the previous attempt's failure to this attempt's first completed step."""
        self.db.execute("UPDATE attempts SET recovery_s = ? WHERE run_id = ? AND attempt = ?",
                        (recovery_s, run_id, attempt))

    def latest_attempt(self, run_id: str) -> int | None:
        """The attempt most recently started (the driver records it before the workers start)."""
        return self.db.execute("SELECT MAX(attempt) FROM attempts WHERE run_id = ?", (run_id,)).fetchone()[0]

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts WHERE run_id = ? ORDER BY attempt", (run_id,)
        ).fetchall()
        return [dict(zip(ATTEMPT_COLUMNS, r, strict=True)) for r in rows]

    # --- events (alerts, diagnoses) -----------------------------------------------------

    def add_event(self, run_id: str, *, kind: str, severity: str, message: str, step: int | None = None,
                  rank: int | None = None, data: dict | None = None) -> int:
        cur = self.db.execute(
            "INSERT INTO events (run_id, time, step, rank, kind, severity, message, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " RETURNING rowid",
            (run_id, time.time(), step, rank, kind, severity, message, json.dumps(data or {})),
        )
        return cur.fetchone()[0]

    def update_event_data(self, event_id: int, data: dict) -> None:
        """Add to an event what was learned after it was recorded (e.g. a stall's node checks)."""
        self.db.execute("UPDATE events SET data = ? WHERE rowid = ?", (json.dumps(data), event_id))

    def events(self, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT time, step, rank, kind, severity, message, data FROM events WHERE run_id = ?"
        args: tuple = (run_id,)
        if kind:
            sql, args = sql + " AND kind = ?", (run_id, kind)
        rows = self.db.execute(sql + " ORDER BY time", args).fetchall()
        return [
            {"time": t, "step": s, "rank": r, "kind": k, "severity": sev, "message": m, "data": json.loads(d or "{}")}
            for t, s, r, k, sev, m, d in rows
        ]

    def finish_run(self, run_id: str, status: str, *, error: str | None = None, summary: dict | None = None) -> None:
        assert status in STATUSES, status
        self.db.execute(
            "UPDATE runs SET status = ?, ended_at = ?, error = ?, summary = ? WHERE id = ?",
            (status, time.time(), error, json.dumps(summary) if summary else None, run_id),
        )

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs ORDER BY created_at").fetchall()
        tags: dict[str, dict[str, str]] = {}
        for run_id, key, value in self.db.execute("SELECT run_id, key, value FROM tags ORDER BY run_id, key").fetchall():
            tags.setdefault(run_id, {})[key] = value  # one query, not one per run (a round trip each on PostgreSQL)
        return [self._run_row(r, tags.get(r[0], {})) for r in rows]

    def run(self, ref: str) -> dict[str, Any]:
        """A run by id, or by name when the name is unique (the latest run of that name otherwise)."""
        cols = ", ".join(RUN_COLUMNS)
        row = self.db.execute(f"SELECT {cols} FROM runs WHERE id = ?", (ref,)).fetchone()
        if row is None:
            row = self.db.execute(
                f"SELECT {cols} FROM runs WHERE name = ? ORDER BY created_at DESC LIMIT 1", (ref,)
            ).fetchone()
        if row is None:
            known = [r["id"] for r in self.runs()[-5:]]
            hint = f" (recent runs: {', '.join(known)})" if known else " (the store has no runs yet)"
            raise UserError(f"no run {ref!r} in {self.path}{hint}")
        return self._run_row(row)

    def driver_beat(self, run_id: str, *, host: str, pid: int) -> None:
        """The driver of a running run is alive (called every DRIVER_BEAT_S)."""
        self.db.execute("UPDATE runs SET driver_host = ?, driver_pid = ?, driver_beat = ? WHERE id = ?",
                        (host, pid, time.time(), run_id))

    def request_stop(self, run_id: str) -> None:
        """`orchestrator stop`: the run's driver sees it at its next beat and stops the run."""
        self.db.execute("UPDATE runs SET stop_requested = ? WHERE id = ?", (time.time(), run_id))

    def stop_requested(self, run_id: str) -> bool:
        row = self.db.execute("SELECT stop_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
        return bool(row and row[0])

    def has_run(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is not None

    def latest_named(self, name: str) -> dict[str, Any] | None:
        """The newest run called `name`, or None."""
        row = self.db.execute(f"SELECT {', '.join(RUN_COLUMNS)} FROM runs WHERE name = ? ORDER BY created_at DESC "
                              "LIMIT 1", (name,)).fetchone()
        return self._run_row(row) if row else None

    def _run_row(self, row: tuple, tags: dict[str, str] | None = None) -> dict[str, Any]:
        d = dict(zip(RUN_COLUMNS, row, strict=True))
        if d["status"] == "running" and driver_gone(d["driver_host"], d["driver_pid"], d["driver_beat"]):
            d["status"] = "lost"
        d["config"] = json.loads(d["config"])
        d["summary"] = json.loads(d["summary"]) if d["summary"] else None
        d["meta"] = json.loads(d["meta"]) if d["meta"] else {}
        d["tags"] = self.tags(d["id"]) if tags is None else tags
        return d

    # --- metrics ------------------------------------------------------------------------

    def log_metrics(self, run_id: str, points: list[tuple[str, int, int, float, float]], attempt: int = 0) -> None:
        """Row-shaped points (key, step, rank, value, time); the metrics actor sends columns instead."""
        by_rank: dict[int, list[tuple[str, int, float]]] = {}
        for key, step, rank, value, _ in points:
            by_rank.setdefault(rank, []).append((key, step, value))
        self.points.append_many([(run_id, rank, attempt, columns(rows), None) for rank, rows in by_rank.items()])

    def lineage(self, run_id: str) -> list[tuple[str, int | None]]:
        """(run id, steps below which its points count) from the oldest ancestor to this run: a fork
        at step N inherits its parent's steps < N, a fork of a fork chains on."""
        chain: list[tuple[str, int | None]] = [(run_id, None)]
        seen = {run_id}
        row = self.db.execute("SELECT parent, fork_step FROM runs WHERE id = ?", (run_id,)).fetchone()
        while row is not None and row[0] is not None and row[0] not in seen:
            parent, fork_step = row
            chain.insert(0, (parent, fork_step))
            seen.add(parent)
            row = self.db.execute("SELECT parent, fork_step FROM runs WHERE id = ?", (parent,)).fetchone()
        return chain

    def metric_keys(self, run_id: str) -> list[str]:
        return sorted({k for rid, _ in self.lineage(run_id) for k in self.points.keys(rid)})

    def ranks(self, run_id: str, key: str) -> list[int]:
        return sorted({rank for rid, _ in self.lineage(run_id) for _, rank, _, _ in self.points.find(rid, key)})

    def rank_points(self, run_id: str, key: str, rank: int) -> Points:
        """One rank's points, inherited history included; where attempts overlap (steps replayed
        after a restore) the latest attempt wins."""
        parts = []
        for rid, upto in self.lineage(run_id):
            found = [(sid, attempt) for sid, r, attempt, _ in self.points.find(rid, key) if r == rank]
            for sid, _ in sorted(found, key=lambda x: x[1]):
                p = self.points.read(sid, hi=None if upto is None else upto - 1)
                parts.append(p)
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return Points.empty()
        return latest_per_step(np.concatenate([p.steps for p in parts]), np.concatenate([p.values for p in parts]))

    def series(self, run_id: str, key: str, *, rank: int | None = None) -> list[dict[str, Any]]:
        """Full resolution, one point per step: one rank's values, or the mean over ranks with min/max."""
        if rank is not None:
            p = self.rank_points(run_id, key, rank)
            return [{"step": int(s), "value": float(v)} for s, v in zip(p.steps, p.values, strict=True)]
        steps, mean, lo, hi, n = self._over_ranks(run_id, key)
        return [
            {"step": int(s), "value": float(m), "min": float(a), "max": float(b), "ranks": int(c)}
            for s, m, a, b, c in zip(steps, mean, lo, hi, n, strict=True)
        ]

    def _over_ranks(self, run_id: str, key: str):
        parts = [self.rank_points(run_id, key, r) for r in self.ranks(run_id, key)]
        if not parts:
            e = np.empty(0)
            return e.astype(np.int64), e, e, e, e
        steps = np.concatenate([p.steps for p in parts])
        vals = np.concatenate([p.values for p in parts])
        uniq, inv = np.unique(steps, return_inverse=True)
        n = np.bincount(inv, minlength=len(uniq))
        mean = np.bincount(inv, weights=vals, minlength=len(uniq)) / n
        lo, hi = np.full(len(uniq), np.inf), np.full(len(uniq), -np.inf)
        np.fmin.at(lo, inv, vals)
        np.fmax.at(hi, inv, vals)
        return uniq, mean, lo, hi, n

    def buckets(self, run_id: str, key: str, buckets: int, *, rank: int | None = None) -> list[dict[str, Any]]:
        """At most `buckets` points, each keeping its bucket's first/last/min/max so spikes stay visible."""
        found = [f for f in self.points.find(run_id, key) if rank is None or f[1] == rank]
        own = len(self.lineage(run_id)) == 1
        if own and len({r for _, r, _, _ in found}) == len(found):  # one attempt per rank: from summaries
            return downsample(self.points, [(sid, n) for sid, _, _, n in found], buckets)
        # inherited history, or attempts that overlap: resolve each step first, then bucket
        if rank is not None:
            p = self.rank_points(run_id, key, rank)
            steps, mean, lo, hi = p.steps, p.values, p.values, p.values
        else:
            steps, mean, lo, hi, _ = self._over_ranks(run_id, key)
        if len(steps) == 0:
            return []
        edges = bucket_edges(int(steps[0]), int(steps[-1]), buckets)
        agg = bucket_points(Points(steps, mean), edges)
        exact = bucket_points(Points(steps, lo), edges), bucket_points(Points(steps, hi), edges)
        agg["min"], agg["max"] = exact[0]["min"], exact[1]["max"]
        return to_rows(agg)

    # --- runs made through the MLflow API (orchestrator/ui/mlflow_api.py) -------------------

    def update_run(self, run_id: str, *, name: str | None = None, config: dict | None = None) -> None:
        """Rename a run, or replace its config: MLflow's params arrive after its run is created."""
        if name is not None:
            self.db.execute("UPDATE runs SET name = ? WHERE id = ?", (name, run_id))
        if config is not None:
            self.db.execute("UPDATE runs SET config = ? WHERE id = ?", (json.dumps(config), run_id))
