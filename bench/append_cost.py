"""CPU of the store's write path per rank flush (50 keys, one point each), before and after
SeriesStore.append_many, side by side in one run on the same batches.

  before  the SeriesStore of --base (default HEAD: `git show BASE:orchestrator/series.py`), one
          append per rank batch, a tick's batches in one transaction (MetricsActor's group commit)
  one     today's append, one per rank batch, a tick in one transaction
  many    today's append_many: a tick's batches of every rank in one call
  many_em (--pg only) append_many with the tail rows sent by executemany (psycopg's pipeline mode)
          instead of COPY: the choice insert_chunks makes

Each tick writes one 50-key batch per rank (--ranks) into a fresh store (SQLite here, or --pg: a
PostgreSQL started here like tests/pg_server.py); --ticks ticks after one warm-up tick (the
series are created then). Reported per peer: this process's CPU per rank flush (the store's work
on SQLite; on PostgreSQL the server's share is not in it) and the wall time per tick, medians of
--repeats, and the ratios before/many. Last stdout line: one JSON object.

    .venv/bin/python bench/append_cost.py [--ranks 64,1024] [--ticks 20] [--repeats 3] [--pg]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from benchlib import ROOT, git_state

sys.path.insert(0, str(ROOT))

from orchestrator import series_write  # noqa: E402
from orchestrator.store import open_store  # noqa: E402

KEYS = 50


def old_series_store(base: str):
    """The SeriesStore class as it was at `base` (a self-contained module: numpy only)."""
    source = subprocess.run(["git", "show", f"{base}:orchestrator/series.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType("series_before")
    exec(compile(source, "series_before.py", "exec"), module.__dict__)  # noqa: S102 (our own file at `base`)
    return module.SeriesStore


def tick_batches(ranks: int, step: int) -> list[tuple]:
    return [("run", rank, 0, {f"k{k:02d}": (np.array([step]), np.array([float(rank + k + step)])) for k in range(KEYS)},
             step + 1) for rank in range(ranks)]


def measure(uri: str, peer: str, ranks: int, ticks: int, before_cls) -> dict:
    store = open_store(uri)
    try:
        if peer == "before":
            ss = before_cls(store.db)

            def write(batches):
                with ss.transaction():
                    for run, rank, attempt, data, seq in batches:
                        ss.append(run, rank, attempt, data, seq=seq)
        elif peer == "one":
            def write(batches):
                with store.transaction():
                    for run, rank, attempt, data, seq in batches:
                        store.points.append(run, rank, attempt, data, seq=seq)
        elif peer == "many":
            def write(batches):
                store.points.append_many(batches)
        else:  # many_em: executemany in place of COPY
            def executemany(db, rows):
                if rows:
                    db.executemany("INSERT INTO chunks (series_id, sealed, step_lo, step_hi, n, steps, vals)"
                                   " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

            def write(batches):
                with patched(series_write, "insert_chunks", executemany):
                    store.points.append_many(batches)
        write(tick_batches(ranks, 0))  # the series are made here, outside the timing
        all_ticks = [tick_batches(ranks, step) for step in range(1, ticks + 1)]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for batches in all_ticks:
            write(batches)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        n = store.db.execute("SELECT SUM(n) FROM series").fetchone()[0]
        assert n == (ticks + 1) * ranks * KEYS, (peer, n)  # every point stored, once
        return {"cpu_ms_per_flush": 1000 * cpu / (ticks * ranks), "wall_ms_per_tick": 1000 * wall / ticks}
    finally:
        store.close()


@contextlib.contextmanager
def patched(module, name: str, value):
    real = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, real)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="64,1024")
    ap.add_argument("--ticks", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--pg", action="store_true")
    args = ap.parse_args()
    before_cls = old_series_store(args.base)
    out = {"bench": "append_cost", "keys": KEYS, "ticks": args.ticks, "repeats": args.repeats, "base": args.base,
           **git_state(), "cases": []}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="append-cost-")))
        if args.pg:
            from tests.pg_server import start_pg_server

            server = start_pg_server()
            stack.callback(server.stop)
        for ranks in (int(r) for r in args.ranks.split(",")):
            runs: dict[str, list[dict]] = {"before": [], "one": [], "many": [], **({"many_em": []} if args.pg else {})}
            for rep in range(args.repeats):
                for peer in runs:  # interleaved: a load swing hits every peer alike
                    uri = server.new_database() if args.pg else str(tmp / f"{ranks}-{rep}-{peer}")
                    runs[peer].append(measure(uri, peer, ranks, args.ticks, before_cls))
            case = {"backend": "postgresql" if args.pg else "sqlite", "ranks": ranks}
            for peer, rs in runs.items():
                for field in ("cpu_ms_per_flush", "wall_ms_per_tick"):
                    case[f"{peer}_{field}"] = round(statistics.median(r[field] for r in rs), 4)
            case["cpu_before_over_many"] = round(case["before_cpu_ms_per_flush"] / case["many_cpu_ms_per_flush"], 2)
            case["wall_before_over_many"] = round(case["before_wall_ms_per_tick"] / case["many_wall_ms_per_tick"], 2)
            print(json.dumps(case), file=sys.stderr, flush=True)
            out["cases"].append(case)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
