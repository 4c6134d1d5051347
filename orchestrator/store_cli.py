"""`orchestrator store migrate` and `orchestrator store copy`.

copy moves runs between stores (SQLite <-> PostgreSQL) row for row: the run, its tags, notes,
events, attempts, checkpoint records, log lines, and its metric series as the stored chunks and
block summaries themselves (so every point, duplicates and replays included, arrives as it was
written). Each run is copied in one transaction of the destination: all of it or nothing.

A tracking server's bookkeeping goes along, so a server moved to the copy (stop it, copy, start
it on DST) still takes every client's batches once: the references to the run's events (renumbered
in DST), and the last batch applied per client. A client's batch numbers span every run it
writes, so every client's number is carried (the larger one where DST has it too); a batch sent
again after the move is then acknowledged, not applied twice. Copy from a store no server is
writing to: a client's batches applied to SRC after the copy would be missing from DST.
"""

from __future__ import annotations

import sqlite3

from common.errors import UserError
from orchestrator.logged_points import times_id
from orchestrator.store import Store, locate, open_store
from orchestrator.store_schema import SCHEMA_VERSION, migrate, read_version
from orchestrator.store_sql import PgConnection, table_columns

# (table, ordering that keeps the source's write order); every row has a run_id
PER_RUN = [("tags", "key"), ("notes", "rowid"), ("attempts", "attempt"),
           ("checkpoints", "step"), ("logs", "id"), ("ingest", "rank, attempt")]  # events: _copy_events
MADE_ANEW = {"rowid"}  # row ids (PostgreSQL's rowid column, logs.id) come from the destination


def add_parser(sub, parser_class) -> None:
    store = sub.add_parser("store", help="tracking store tools: create or upgrade its schema, copy runs between stores")
    tools = store.add_subparsers(dest="store_command", required=True, parser_class=parser_class)
    mig = tools.add_parser("migrate", help="create the store's tables, or upgrade an older store to this version")
    mig.add_argument("--store", metavar="URI", help="the store (default: $ORCHESTRATOR_STORE, else $ORCHESTRATOR_HOME)")
    copy = tools.add_parser("copy", help="copy runs from one store to another, every point (SQLite <-> PostgreSQL)")
    copy.add_argument("src", metavar="SRC", help="store to read: a directory, a SQLite file or postgresql://...")
    copy.add_argument("dst", metavar="DST", help="store to write (made if new)")
    copy.add_argument("--run", action="append", default=[], metavar="RUN", help="only this run (id or name; repeatable)")


def cmd_store(args, argv, *, out=print) -> int:
    if args.store_command == "migrate":
        return cmd_migrate(args.store, out=out)
    return cmd_copy(args.src, args.dst, args.run, out=out)


def cmd_migrate(uri: str | None, *, out=print) -> int:
    where = locate(uri)
    if where.kind == "http":
        raise UserError(f"orchestrator store migrate: {where.shown} is an `orchestrator server`; migrate the store"
                        " it serves (its --store) instead")
    if where.kind == "postgresql":
        db = PgConnection(where.uri)
        try:
            before, after = migrate(db)
        finally:
            db.close()
    else:
        before = _sqlite_version(where.path)
        Store(where.path.parent, file=where.path.name).close()  # a SQLite store migrates itself on open
        after = SCHEMA_VERSION
    if before == after:
        out(f"store {where.shown}: schema version {after}, nothing to do")
    elif before is None:
        out(f"store {where.shown}: created at schema version {after}")
    else:
        out(f"store {where.shown}: schema version {before} -> {after}")
    return 0


def _sqlite_version(path) -> int | None:
    if not path.is_file():
        return None
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return read_version(db)
    except sqlite3.Error:
        return None  # not readable: opening it as a Store says why, in one line
    finally:
        db.close()


def cmd_copy(src_uri: str, dst_uri: str, refs: list[str], *, out=print) -> int:
    src_where, dst_where = locate(src_uri), locate(dst_uri)
    if src_where.uri == dst_where.uri:
        raise UserError(f"orchestrator store copy: {src_where.shown} is both the source and the destination")
    if "http" in (src_where.kind, dst_where.kind):
        raise UserError("orchestrator store copy: copy between the stores themselves (a directory, a SQLite file or"
                        " postgresql://...), not through an `orchestrator server`")
    src = open_store(src_uri, create=False)
    try:
        dst = open_store(dst_uri)
        try:
            ids = [src.run(r)["id"] for r in refs] if refs else [r["id"] for r in src.runs()]
            copied = 0
            for run_id in dict.fromkeys(ids):
                if dst.has_run(run_id):
                    out(f"run {run_id}: already in {dst_where.shown}, left as it is")
                    continue
                counts = copy_run(src, dst, run_id)
                copied += 1
                out(f"run {run_id}: copied {counts['points']} points in {counts['series']} series,"
                    f" {counts['events']} events, {counts['logs']} log lines")
            out(f"copied {copied} run(s) from {src_where.shown} to {dst_where.shown}")
        finally:
            dst.close()
    finally:
        src.close()
    return 0


def copy_run(src: Store, dst: Store, run_id: str) -> dict[str, int]:
    """One run, row for row, in one transaction of `dst`. Returns counts of what was copied."""
    counts = {"series": 0, "points": 0}
    with dst.transaction():
        _copy_rows(src, dst, "runs", "id = ?", (run_id,), "id")
        for table, order in PER_RUN:
            counts[table] = _copy_rows(src, dst, table, "run_id = ?", (run_id,), order)
        counts["events"] = _copy_events(src, dst, run_id)
        _copy_clients(src, dst)
        # the run's own series, and the wall times of points logged through MLflow or an import
        for sid, series_run, key, rank, attempt, tail_n, n in src.db.execute(
                "SELECT id, run_id, key, rank, attempt, tail_n, n FROM series WHERE run_id IN (?, ?) ORDER BY id",
                (run_id, times_id(run_id))).fetchall():
            new = dst.db.execute("INSERT INTO series (run_id, key, rank, attempt, tail_n, n) VALUES (?, ?, ?, ?, ?, ?)"
                                 " RETURNING id", (series_run, key, rank, attempt, tail_n, n)).fetchone()[0]
            chunks = src.db.execute("SELECT sealed, step_lo, step_hi, n, steps, vals FROM chunks WHERE series_id = ?"
                                    " ORDER BY rowid", (sid,)).fetchall()
            dst.db.executemany("INSERT INTO chunks (series_id, sealed, step_lo, step_hi, n, steps, vals)"
                               " VALUES (?, ?, ?, ?, ?, ?, ?)", [(new, *_plain(c)) for c in chunks])
            summaries = src.db.execute("SELECT step_lo, summary FROM summaries WHERE series_id = ? ORDER BY step_lo",
                                       (sid,)).fetchall()
            dst.db.executemany("INSERT INTO summaries (series_id, step_lo, summary) VALUES (?, ?, ?)",
                               [(new, *_plain(s)) for s in summaries])
            if series_run == run_id:  # wall times are not points of their own
                counts["series"] += 1
                counts["points"] += sum(c[3] for c in chunks)
    return counts


def _copy_rows(src: Store, dst: Store, table: str, where: str, args: tuple, order: str) -> int:
    cols = sorted(table_columns(src.db, table) - MADE_ANEW - ({"id"} if table == "logs" else set()))
    missing = set(cols) - table_columns(dst.db, table)
    if missing:
        raise UserError(f"orchestrator store copy: the destination's {table} table lacks {', '.join(sorted(missing))};"
                        " run `orchestrator store migrate` on it first")
    rows = src.db.execute(f"SELECT {', '.join(cols)} FROM {table} WHERE {where} ORDER BY {order}", args).fetchall()
    if rows:
        dst.db.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                           [_plain(r) for r in rows])
    return len(rows)


def _copy_events(src: Store, dst: Store, run_id: str) -> int:
    """The run's events in their order, and the server's references to them, pointed at the
    events' new row ids."""
    cols = sorted(table_columns(src.db, "events") - MADE_ANEW)
    rows = src.db.execute(f"SELECT rowid, {', '.join(cols)} FROM events WHERE run_id = ? ORDER BY rowid",
                          (run_id,)).fetchall()
    insert = f"INSERT INTO events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) RETURNING rowid"
    new_ids = {row[0]: dst.db.execute(insert, _plain(row[1:])).fetchone()[0] for row in rows}
    if new_ids:
        refs = src.db.execute("SELECT r.ref, r.event_id FROM ingest_events r JOIN events e ON e.rowid = r.event_id"
                              " WHERE e.run_id = ? ORDER BY r.ref", (run_id,)).fetchall()
        dst.db.executemany("INSERT INTO ingest_events (ref, event_id) VALUES (?, ?) ON CONFLICT (ref) DO NOTHING",
                           [(ref, new_ids[old]) for ref, old in refs])
    return len(rows)


def _copy_clients(src: Store, dst: Store) -> None:
    """Every client's last applied batch (the larger where DST knows the client too)."""
    rows = src.db.execute("SELECT client, last_seq, time FROM ingest_clients ORDER BY client").fetchall()
    dst.db.executemany(
        "INSERT INTO ingest_clients (client, last_seq, time) VALUES (?, ?, ?) ON CONFLICT (client) DO UPDATE SET"
        " last_seq = CASE WHEN excluded.last_seq > ingest_clients.last_seq THEN excluded.last_seq"
        " ELSE ingest_clients.last_seq END,"
        " time = CASE WHEN excluded.time > ingest_clients.time THEN excluded.time ELSE ingest_clients.time END",
        rows)


def _plain(row) -> tuple:
    """memoryview (psycopg's bytea in some paths) -> bytes, so either driver can write it."""
    return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
