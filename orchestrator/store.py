"""The tracking store: one SQLite file in $ORCHESTRATOR_HOME, in WAL mode so the CLI can read
while a run writes.

runs:    one row per run (id, name, status, config, timestamps, git commit, host, command line)
metrics: one row per (run, key, step, rank, attempt); rank -1 is never used: run-level values
         are logged by rank 0.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from orchestrator.errors import UserError

STATUSES = ("running", "completed", "failed", "interrupted")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    parent TEXT,
    fork_step INTEGER,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    git_commit TEXT,
    host TEXT,
    command TEXT,
    world_size INTEGER,
    error TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    step INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    value REAL NOT NULL,
    time REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS metrics_by_key ON metrics (run_id, key, step);
"""


def home() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_HOME", ".orchestrator")).absolute()


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else home()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "store.db"
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # --- runs ---------------------------------------------------------------------------

    def create_run(self, *, run_id: str, name: str, config: dict, git_commit: str | None, host: str,
                   command: str, world_size: int, parent: str | None = None, fork_step: int | None = None) -> None:
        self.db.execute(
            "INSERT INTO runs (id, name, status, parent, fork_step, config, created_at, git_commit, host, command, world_size)"
            " VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, name, parent, fork_step, json.dumps(config), time.time(), git_commit, host, command, world_size),
        )

    def finish_run(self, run_id: str, status: str, *, error: str | None = None, summary: dict | None = None) -> None:
        assert status in STATUSES, status
        self.db.execute(
            "UPDATE runs SET status = ?, ended_at = ?, error = ?, summary = ? WHERE id = ?",
            (status, time.time(), error, json.dumps(summary) if summary else None, run_id),
        )

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY created_at").fetchall()
        return [self._run_row(r) for r in rows]

    def run(self, ref: str) -> dict[str, Any]:
        """A run by id, or by name when the name is unique (the latest run of that name otherwise)."""
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (ref,)).fetchone()
        if row is None:
            row = self.db.execute(
                "SELECT * FROM runs WHERE name = ? ORDER BY created_at DESC LIMIT 1", (ref,)
            ).fetchone()
        if row is None:
            known = [r["id"] for r in self.runs()[-5:]]
            hint = f" (recent runs: {', '.join(known)})" if known else " (the store has no runs yet)"
            raise UserError(f"no run {ref!r} in {self.path}{hint}")
        return self._run_row(row)

    def _run_row(self, row: tuple) -> dict[str, Any]:
        cols = [
            "id", "name", "status", "parent", "fork_step", "config", "created_at", "ended_at",
            "git_commit", "host", "command", "world_size", "error", "summary",
        ]
        d = dict(zip(cols, row, strict=True))
        d["config"] = json.loads(d["config"])
        d["summary"] = json.loads(d["summary"]) if d["summary"] else None
        return d

    # --- metrics ------------------------------------------------------------------------

    def log_metrics(self, run_id: str, points: list[tuple[str, int, int, float, float]], attempt: int = 0) -> None:
        """points: (key, step, rank, value, time)."""
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO metrics (run_id, key, step, rank, value, time, attempt) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(run_id, k, s, r, v, t, attempt) for k, s, r, v, t in points],
        )
        self.db.execute("COMMIT")

    def metric_keys(self, run_id: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT key FROM metrics WHERE run_id = ? ORDER BY key", (run_id,))]

    def ranks(self, run_id: str, key: str) -> list[int]:
        sql = "SELECT DISTINCT rank FROM metrics WHERE run_id = ? AND key = ? ORDER BY rank"
        return [r[0] for r in self.db.execute(sql, (run_id, key))]

    def series(self, run_id: str, key: str, *, rank: int | None = None) -> list[dict[str, Any]]:
        """One point per step: the mean over ranks with min/max, or one rank's values."""
        if rank is not None:
            sql = "SELECT step, value FROM metrics WHERE run_id = ? AND key = ? AND rank = ? ORDER BY step"
            return [{"step": s, "value": v} for s, v in self.db.execute(sql, (run_id, key, rank))]
        sql = (
            "SELECT step, AVG(value), MIN(value), MAX(value), COUNT(*) FROM metrics"
            " WHERE run_id = ? AND key = ? GROUP BY step ORDER BY step"
        )
        return [
            {"step": s, "value": avg, "min": lo, "max": hi, "ranks": n}
            for s, avg, lo, hi, n in self.db.execute(sql, (run_id, key))
        ]


def bucketize(points: list[dict[str, Any]], buckets: int) -> list[dict[str, Any]]:
    """Downsample to at most `buckets` points without hiding spikes: each bucket keeps its first
    and last value and the min and max of everything in it."""
    if buckets <= 0 or len(points) <= buckets:
        return points
    out = []
    lo_step, hi_step = points[0]["step"], points[-1]["step"]
    width = (hi_step - lo_step + 1) / buckets
    current: list[dict[str, Any]] = []
    current_b = None
    for p in points + [None]:
        b = None if p is None else min(int((p["step"] - lo_step) / width), buckets - 1)
        if current and b != current_b:
            vals = [q["value"] for q in current]
            out.append({
                "step": current[0]["step"],
                "last_step": current[-1]["step"],
                "value": sum(vals) / len(vals),
                "min": min(q.get("min", q["value"]) for q in current),
                "max": max(q.get("max", q["value"]) for q in current),
                "first": vals[0],
                "last": vals[-1],
                "count": len(current),
            })
            current = []
        if p is not None:
            current.append(p)
            current_b = b
    return out
