"""A read-only view of the tracking store, opened per request.

The UI used to share one SQLite connection behind a lock, so one slow request (a compare naming a
run 2,000 times) made every other wait. In WAL mode any number of readers run beside the writer:
each request opens its own read-only connection (about 0.1 ms) and closes it when answered.
Read-only also means that nothing a UI client sends can change the store. A PostgreSQL store is
read the same way, through a connection whose transactions are read-only.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from orchestrator.store import Store, home
from orchestrator.store_sql import PgConnection


class ReadStore(Store):
    """Store's queries over a read-only connection. Store.__init__ is skipped on purpose: it
    creates the directory and the schema, and migrates, which a reader must not do.
    `where`: a SQLite file, or a postgresql:// URI (the Store's `uri`)."""

    def __init__(self, where: str | Path):
        if str(where).startswith(("postgresql://", "postgres://")):
            self.kind = "postgresql"
            self.db = PgConnection(str(where), read_only=True)
            self.uri, self.path, self.root = str(where), self.db.shown, home()
        else:
            self.path = Path(where).absolute()
            self.uri, self.root = str(self.path), self.path.parent
            self.db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=5, isolation_level=None)
        try:
            self._attach()  # points and logs, over this read-only connection
        except BaseException:
            self.db.close()
            raise
