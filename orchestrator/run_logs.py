"""The ranks' output lines (a script's stdout and stderr), kept with the run: per attempt, rank
and stream, in order, for `orchestrator logs` and the failure report."""

from __future__ import annotations

from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    stream TEXT NOT NULL,
    time REAL NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_by_run ON logs (run_id, id);
"""
MAX_LINE = 16_384  # a runaway line (a progress bar without newlines) is cut, not stored whole


class LogStore:
    def __init__(self, db):
        self.db = db  # the table is made by the store (store_schema.py)

    def add(self, run_id: str, attempt: int, rank: int, lines: list[tuple[float, str, str]]) -> None:
        """lines: (time, stream, text), stream "stdout" or "stderr"."""
        self.db.executemany(
            "INSERT INTO logs (run_id, attempt, rank, stream, time, line) VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, attempt, rank, stream, t, text[:MAX_LINE]) for t, stream, text in lines])

    def read(self, run_id: str, *, rank: int | None = None, attempt: int | None = None, after: int = 0,
             limit: int = 100_000, tail: int | None = None) -> list[dict[str, Any]]:
        """Lines in order (after id `after`); `tail`: only the last N of them."""
        where, args = ["run_id = ?", "id > ?"], [run_id, after]
        if rank is not None:
            where.append("rank = ?")
            args.append(rank)
        if attempt is not None:
            where.append("attempt = ?")
            args.append(attempt)
        order = "DESC" if tail else "ASC"
        rows = self.db.execute(f"SELECT id, attempt, rank, stream, time, line FROM logs WHERE {' AND '.join(where)} "
                               f"ORDER BY id {order} LIMIT ?", (*args, tail or limit)).fetchall()
        if tail:
            rows.reverse()
        return [{"id": i, "attempt": a, "rank": r, "stream": s, "time": t, "line": line} for i, a, r, s, t, line in rows]
