"""Writing points: many senders' batches (the ranks of one or more runs) in one transaction.

A tick of a thousand ranks at 50 keys is 50,000 new tail rows. Written one batch at a time that
cost two statements per key; here a whole tick is a handful of statements, whatever its size:

1. the senders' last batch numbers, in one query: a batch already applied is skipped
2. the series ids not cached yet: created by one executemany, read back in one query
3. the series' counters, read (on PostgreSQL also locked) in one query inside the write
   transaction, so another process writing the same store cannot make them stale
4. the tail rows: one executemany (SQLite) or one COPY (PostgreSQL)
5. sealing, as before, of the series that reached a chunk's size
6. the counters and the batch numbers, written back in one statement each

The rows are those that appending the batches one by one would write: when a sender has two
batches in one call, the second goes in a later "round", after the first's series are sealed.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

VALUES_ROWS = 1000  # keys per VALUES list (SQLite takes 32,766 parameters, PostgreSQL 65,535)
IN_IDS = 10_000  # ids per IN (...) list

Sender = tuple[str, int, int]  # (run_id, rank, attempt)


def append_many(ss, batches: list[tuple], *, chunk: int) -> list[int]:
    """batches: (run_id, rank, attempt, {key: (steps, values)}, seq or None), in the order they
    were sent. Returns the points stored of each; 0 for a batch already applied (by its seq)."""
    out = [0] * len(batches)
    if not batches:
        return out
    db = ss.db
    with ss.transaction():
        fresh, seqs = _fresh(db, batches)
        # few objects that live through the call: at a thousand ranks, tens of thousands of
        # long-lived tuples made Python's garbage collector cost as much as the writing
        rounds: list[list[int]] = []  # batch indices per round: a sender at most once in each
        seen: dict[Sender, int] = defaultdict(int)
        for i, (run_id, rank, attempt, _, _) in enumerate(batches):
            if fresh[i]:
                sender = (run_id, int(rank), int(attempt))
                r = seen[sender]
                seen[sender] += 1
                if r == len(rounds):
                    rounds.append([])
                rounds[r].append(i)
        sid_of, sids = _series_ids(ss, (batches[i] for r in rounds for i in r))
        tails, totals = _counters(db, sids)
        for indices in rounds:
            touched: list[int] = []
            insert_chunks(db, _tail_rows(batches, indices, sid_of, tails, totals, touched, out))
            for sid in touched:
                if tails[sid] >= chunk:
                    tails[sid] = ss._seal(sid)
        _write_counters(db, tails, totals)
        if seqs:
            db.executemany(
                "INSERT INTO ingest (run_id, rank, attempt, last_seq) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (run_id, rank, attempt) DO UPDATE SET last_seq = excluded.last_seq",
                [(*sender, seq) for sender, seq in seqs.items()],
            )
    return out


def _tail_rows(batches, indices, sid_of, tails, totals, touched, out):
    """The tail rows of batches[indices], made as they are sent; counts what they add to each
    series (tails, totals), which series they touched, and the points of each batch (out)."""
    for i in indices:
        run_id, rank, attempt, data, _ = batches[i]
        rank, attempt = int(rank), int(attempt)
        for key, (steps, vals) in data.items():
            n = len(steps)
            if not n:
                continue
            steps = np.ascontiguousarray(steps, dtype="<i8")
            sid = sid_of((run_id, key, rank, attempt))
            # one point (a flush of a rank that logs every step): no numpy reductions
            lo, hi = (int(steps[0]),) * 2 if n == 1 else (int(steps.min()), int(steps.max()))
            tails[sid] += n
            totals[sid] += n
            touched.append(sid)
            out[i] += n
            yield sid, 0, lo, hi, n, steps.tobytes(), np.ascontiguousarray(vals, dtype="<f8").tobytes()


def last_seqs(db, senders) -> dict[Sender, int]:
    """The last batch number applied per sender (those with none are absent)."""
    rows = _match(db, "ingest", ("run_id", "rank", "attempt"), "t.run_id, t.rank, t.attempt, t.last_seq",
                  sorted(set(senders)))
    return {(r[0], r[1], r[2]): r[3] for r in rows}


def _fresh(db, batches) -> tuple[list[bool], dict[Sender, int]]:
    """Which batches are new (in order: a sender's batch numbers only go up), and the new last
    batch number of each sender that has one."""
    senders = {(b[0], int(b[1]), int(b[2])) for b in batches if b[4] is not None}
    last = last_seqs(db, senders) if senders else {}
    fresh, new = [], {}
    for run_id, rank, attempt, _, seq in batches:
        sender = (run_id, int(rank), int(attempt))
        if seq is None:
            fresh.append(True)
        elif sender in last and seq <= last[sender]:
            fresh.append(False)
        else:
            fresh.append(True)
            last[sender] = new[sender] = int(seq)
    return fresh, new


def _series_ids(ss, batches):
    """A lookup (run_id, key, rank, attempt) -> series id for the keys with points in `batches`,
    and those ids in order; the series not known yet are created."""
    known, new = ss._ids.get, ss._new_ids.get
    missing, sids = set(), set()
    for run_id, rank, attempt, data, _ in batches:
        rank, attempt = int(rank), int(attempt)
        for key, (steps, _) in data.items():
            if len(steps):
                k = (run_id, key, rank, attempt)
                sid = known(k)
                if sid is None:
                    sid = new(k)
                if sid is None:
                    missing.add(k)
                else:
                    sids.add(sid)
    if missing:
        missing = sorted(missing)
        ss.db.executemany("INSERT INTO series (run_id, key, rank, attempt) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                          missing)
        for sid, *k in _match(ss.db, "series", ("run_id", "key", "rank", "attempt"),
                              "t.id, t.run_id, t.key, t.rank, t.attempt", missing):
            ss._new_ids[tuple(k)] = sid  # valid once the transaction commits (SeriesStore.transaction)
            sids.add(sid)

    def sid_of(k):
        sid = known(k)
        return new(k) if sid is None else sid
    return sid_of, sorted(sids)


def _match(db, table: str, cols: tuple[str, ...], select: str, keys: list[tuple]) -> list[tuple]:
    """Rows of `table` whose `cols` equal one of `keys`: a join with a VALUES list, one query per
    VALUES_ROWS keys (the same SQL on SQLite and PostgreSQL)."""
    rows = []
    one = "(" + ", ".join("?" * len(cols)) + ")"
    on = " AND ".join(f"t.{c} = v.{c}" for c in cols)
    for lo in range(0, len(keys), VALUES_ROWS):
        part = keys[lo : lo + VALUES_ROWS]
        sql = f"WITH v ({', '.join(cols)}) AS (VALUES {', '.join([one] * len(part))}) SELECT {select} FROM {table} t JOIN v ON {on}"
        rows += db.execute(sql, [x for k in part for x in k]).fetchall()
    return rows


def _counters(db, sids: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """tail_n and n of each series. PostgreSQL: the rows are locked (in id order, so two writers
    cannot deadlock) until the transaction ends; SQLite's write transaction holds the file's lock."""
    lock = " FOR UPDATE" if getattr(db, "dialect", "sqlite") == "postgresql" else ""
    tails, totals = {}, {}
    for lo in range(0, len(sids), IN_IDS):
        part = sids[lo : lo + IN_IDS]
        sql = f"SELECT id, tail_n, n FROM series WHERE id IN ({', '.join('?' * len(part))}) ORDER BY id{lock}"
        for sid, tail_n, n in db.execute(sql, part).fetchall():
            tails[sid], totals[sid] = tail_n, n
    return tails, totals


def _write_counters(db, tails: dict[int, int], totals: dict[int, int]) -> None:
    if not tails:
        return
    if getattr(db, "dialect", "sqlite") == "postgresql":  # one statement, the values as three arrays
        sids = list(tails)
        db.execute("UPDATE series SET tail_n = v.tail_n, n = v.n FROM unnest(?::bigint[], ?::bigint[], ?::bigint[])"
                   " AS v (id, tail_n, n) WHERE series.id = v.id",
                   (sids, [tails[s] for s in sids], [totals[s] for s in sids]))
    else:  # in-process: a prepared statement run per row costs microseconds
        db.executemany("UPDATE series SET tail_n = ?, n = ? WHERE id = ?", ((tails[s], totals[s], s) for s in tails))


def insert_chunks(db, rows) -> None:
    """Tail rows (series_id, sealed, step_lo, step_hi, n, steps, vals), in this order (an iterable:
    rows are made as they are sent)."""
    if hasattr(db, "copy_rows"):  # PostgreSQL: COPY, binary
        db.copy_rows("chunks", ("series_id", "sealed", "step_lo", "step_hi", "n", "steps", "vals"),
                     ("int8", "int8", "int8", "int8", "int8", "bytea", "bytea"), rows)
    else:
        db.executemany("INSERT INTO chunks (series_id, sealed, step_lo, step_hi, n, steps, vals) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       rows)
