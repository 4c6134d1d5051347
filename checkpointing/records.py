"""Checkpoint records in the tracking store: one row per (run, step) with its outcome.

The store belongs to orchestrator/store.py; this table is ours and is created on first use in
the same SQLite file, so `orchestrator checkpoints RUN` also shows failed attempts, which leave
no manifest behind.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from checkpointing.layout import step_dir
from common.sqlite_wal import use_wal

STATUSES = ("committed", "failed", "corrupt")

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    status TEXT NOT NULL,
    bytes INTEGER,
    blocked_s REAL,
    upload_s REAL,
    uri TEXT,
    error TEXT,
    time REAL NOT NULL,
    PRIMARY KEY (run_id, step)
);
"""

COLUMNS = ("run_id", "step", "status", "bytes", "blocked_s", "upload_s", "uri", "error", "time")


class CheckpointRecords:
    def __init__(self, db: str | os.PathLike | Any):
        """db: the store's SQLite file, or an open connection of the store's (e.g. to PostgreSQL),
        whose schema the store made; closed by close()."""
        if not isinstance(db, str | os.PathLike):
            self.db = db
            return
        self.db = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
        use_wal(self.db)
        self.db.executescript(SCHEMA)

    def add(self, *, run_id: str, step: int, status: str, bytes: int | None = None, blocked_s: float | None = None,
            upload_s: float | None = None, uri: str | None = None, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"checkpoint status must be one of {STATUSES}, got {status!r}")
        self.db.execute(
            "INSERT INTO checkpoints (run_id, step, status, bytes, blocked_s, upload_s, uri, error, time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, step) DO UPDATE SET status = excluded.status,"
            " bytes = excluded.bytes, blocked_s = excluded.blocked_s, upload_s = excluded.upload_s, uri = excluded.uri,"
            " error = excluded.error, time = excluded.time",
            (run_id, step, status, bytes, blocked_s, upload_s, uri, error, time.time()),
        )

    def mark_corrupt(self, *, run_id: str, step: int, uri: str, error: str) -> None:
        """Keep the sizes/timings of the committed row, change its status."""
        cur = self.db.execute("UPDATE checkpoints SET status = 'corrupt', error = ? WHERE run_id = ? AND step = ?",
                              (error, run_id, step))
        if cur.rowcount == 0:
            self.add(run_id=run_id, step=step, status="corrupt", uri=uri, error=error)

    def list(self, run_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM checkpoints WHERE run_id = ? ORDER BY step",
                               (run_id,))
        return [dict(zip(COLUMNS, r, strict=True)) for r in rows]

    def close(self) -> None:
        self.db.close()


def corrupt_recorder(db_path: str | os.PathLike, run_id: str, uri: str) -> Callable[[Any], None]:
    """An `on_corrupt` callback for loader.load_latest that marks the checkpoint corrupt in the store."""
    def record(error) -> None:
        records = CheckpointRecords(db_path)
        try:
            records.mark_corrupt(run_id=run_id, step=error.step, uri=f"{uri.rstrip('/')}/{step_dir(error.step)}",
                                 error=error.reason)
        finally:
            records.close()

    return record
