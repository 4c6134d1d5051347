"""Turning a SQLite file to WAL when other processes open it at the same moment.

Changing the journal mode takes an exclusive lock, and SQLite answers "database is locked" at
once instead of waiting through the busy timeout while another connection does the same (two
drivers starting on one fresh store). The change is made once per file; later opens find WAL.
"""

from __future__ import annotations

import random
import sqlite3
import time

WAL_WAIT_S = 30.0  # as long as the connections' busy timeout


def use_wal(db: sqlite3.Connection, wait_s: float = WAL_WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    pause = 0.005
    while True:
        try:
            if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            busy = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_BUSY  # of an extended code too
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(pause * (1 + random.random()))
        pause = min(pause * 2, 0.25)
