"""The tracking store's tables, their version, and migration.

Version 1: runs, tags, notes, events, attempts (below), series/chunks/summaries/ingest
(series.py), logs (run_logs.py), checkpoints (checkpointing/records.py), schema_version.
Version 2: ingest_clients and ingest_events (below), the tracking server's bookkeeping, which
its ingest API used to create for itself when it started.
Stores made before versions were recorded (SQLite only) count as version 0.

SQLite stores migrate themselves when opened, as they always have (missing tables and columns
are added). A PostgreSQL store is shared, so it changes only through `orchestrator store
migrate`; an empty database is given the current schema by the first writer that opens it.
A store whose version is newer than this code is refused: older code could misread it.
"""

from __future__ import annotations

from checkpointing.records import SCHEMA as CHECKPOINTS_SCHEMA
from common.errors import StoreError
from orchestrator.run_logs import SCHEMA as LOGS_SCHEMA
from orchestrator.series import SCHEMA as SERIES_SCHEMA
from orchestrator.store_sql import existing_tables, pg_ddl, table_columns, table_names

SCHEMA_VERSION = 2
MIGRATE_LOCK = 0x6F726368  # a PostgreSQL advisory lock: one migration at a time

RUNS_SCHEMA = """
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
    summary TEXT,
    meta TEXT,
    driver_host TEXT,
    driver_pid INTEGER,
    driver_beat REAL,
    stop_requested REAL
);
CREATE TABLE IF NOT EXISTS tags (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS notes (
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    time REAL NOT NULL,
    step INTEGER,
    rank INTEGER,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, time);
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL NOT NULL,
    resumed_from_step INTEGER,
    ended_at REAL,
    status TEXT,
    cause TEXT,
    message TEXT,
    rank INTEGER,
    node TEXT,
    failed_step INTEGER,
    steps_lost INTEGER,
    recovery_s REAL,
    PRIMARY KEY (run_id, attempt)
);
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL
);
"""
# the tracking server's (orchestrator/ui/ingest.py): the last batch applied per client (a batch sent
# again is acknowledged, not applied twice), and the rows of events its clients refer to by name
INGEST_SCHEMA = """
CREATE TABLE IF NOT EXISTS ingest_clients (
    client TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_events (
    ref TEXT PRIMARY KEY,
    event_id INTEGER NOT NULL
);
"""
RUN_COLUMNS = [
    "id", "name", "status", "parent", "fork_step", "config", "created_at", "ended_at",
    "git_commit", "host", "command", "world_size", "error", "summary", "meta", "driver_host", "driver_pid",
    "driver_beat", "stop_requested",
]
COLUMN_TYPES = {"driver_pid": "INTEGER", "driver_beat": "REAL", "stop_requested": "REAL"}  # added to older stores with these types
SCRIPTS = (RUNS_SCHEMA, SERIES_SCHEMA, LOGS_SCHEMA, CHECKPOINTS_SCHEMA, INGEST_SCHEMA)
TABLES = [name for script in SCRIPTS for name in table_names(script)]


def is_pg(db) -> bool:
    return getattr(db, "dialect", "sqlite") == "postgresql"


def read_version(db) -> int | None:
    """The store's schema version; 0 for a store from before versions; None for an empty database."""
    tables = existing_tables(db)
    if "schema_version" not in tables:
        return 0 if "runs" in tables else None
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(db) -> tuple[int | None, int]:
    """Create what is missing (tables, indexes, runs' newer columns) and record the version.
    Returns (version before, version after). Safe to run again, and beside another migrate."""
    pg = is_pg(db)
    if pg:
        db.execute("BEGIN")
        db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
    try:
        before = read_version(db)
        if before is not None and before > SCHEMA_VERSION:
            raise newer_error(before, getattr(db, "shown", "this store"))
        for script in SCRIPTS:
            db.executescript(script)
        have = table_columns(db, "runs")
        for col in RUN_COLUMNS:
            if col not in have:
                kind = COLUMN_TYPES.get(col, "TEXT")
                db.execute(f"ALTER TABLE runs ADD COLUMN {col} {pg_ddl(kind) if pg else kind}")
        if before != SCHEMA_VERSION:
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        if pg:
            db.execute("COMMIT")
    except BaseException:
        if pg and db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return before, SCHEMA_VERSION


def newer_error(version: int, shown: str) -> StoreError:
    return StoreError(f"the tracking store {shown} has schema version {version}, newer than this orchestrator's"
                      f" ({SCHEMA_VERSION}); upgrade orchestrator to use it")


def prepare(db, shown: str) -> None:
    """On open: SQLite migrates itself (today's behaviour); PostgreSQL is checked, and an empty
    database is given the schema (a reader never gets here with one: store.py's empty view)."""
    version = read_version(db)
    if version is not None and version > SCHEMA_VERSION:
        raise newer_error(version, shown)
    if not is_pg(db) or version is None:
        migrate(db)
        return
    missing = [t for t in TABLES if t not in existing_tables(db)]
    columns = [] if "runs" in missing else [c for c in RUN_COLUMNS if c not in table_columns(db, "runs")]
    if version < SCHEMA_VERSION or missing or columns:
        what = f"version {version}" + (f", missing {', '.join(missing + columns)}" if missing or columns else "")
        raise StoreError(f"the tracking store {shown} has an older schema ({what}, this orchestrator needs"
                         f" {SCHEMA_VERSION}): run `orchestrator store migrate --store {shown}`")
