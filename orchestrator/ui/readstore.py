"""A read-only view of the tracking store, opened per request.

The UI used to share one SQLite connection behind a lock, so one slow request (a compare naming a
run 2,000 times) made every other wait. In WAL mode any number of readers run beside the writer:
each request opens its own read-only connection (about 0.1 ms) and closes it when answered.
Read-only also means that nothing a UI client sends can change the store.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from orchestrator.series import SeriesStore
from orchestrator.store import Store


class ReadStore(Store):
    """Store's queries over a read-only connection. Store.__init__ is skipped on purpose: it
    creates the directory and the schema, and migrates, which a reader must not do."""

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.root = self.path.parent
        self.db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=5, isolation_level=None)
        try:
            self.points = SeriesStore(self.db)
        except BaseException:
            self.db.close()
            raise
