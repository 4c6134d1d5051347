"""The tracking store on PostgreSQL vs SQLite, side by side in one run, on the same points.

Ingest: --ranks ranks x --keys keys x --steps steps, written the way the metrics actor writes
(one store.points.append per rank per flush, all keys, --flush-steps steps each, with its batch
number for idempotence), each repeat into a fresh store; the two backends alternate so neither
always runs on the warmer machine. Points/s = points / wall time; medians over --repeats.

Queries, on a store holding the ingested run plus one --read-points series (rank 0 of a key of
its own), each on a connection opened for it, as the CLI and UI do; medians over --reads:
  buckets      store.buckets(run, key, 1000) of the long series (block summaries + tail)
  full         store.series(run, key, rank=0): every point of the long series
  mean_ranks   store.series(run, key): one ingested key, mean/min/max over ranks per step
  runs         store.runs() with 50 runs in the store
Both backends must return the same answers (checked before timing).

PostgreSQL is Debian's postgresql 15 started here (initdb + pg_ctl on loopback, tests/pg_server.py)
with crash-safe files and synchronous_commit=off, which is what SQLite's WAL with
synchronous=NORMAL gives (a crash loses the last commits, never consistency).

    .venv/bin/python bench/store_backends.py [--repeats 3] [--ranks 4] [--keys 200] [--steps 1000]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from orchestrator.store import open_store  # noqa: E402
from tests.pg_server import start_pg_server  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def make_run(store, run_id: str) -> None:
    store.create_run(run_id=run_id, name=run_id, config={"bench": True}, git_commit=None, host="bench", command="",
                     world_size=1)


def ingest(uri: str, args, values: np.ndarray) -> float:
    """Seconds to write ranks x keys x steps points as the metrics actor would."""
    store = open_store(uri)
    make_run(store, "ingest")
    keys = [f"layers/{i}/grad_norm" for i in range(args.keys)]
    t0 = time.perf_counter()
    for seq, lo in enumerate(range(0, args.steps, args.flush_steps)):
        steps = np.arange(lo, min(lo + args.flush_steps, args.steps), dtype=np.int64)
        for rank in range(args.ranks):
            store.points.append("ingest", rank, 0, {k: (steps, values[rank, i, steps]) for i, k in enumerate(keys)},
                                seq=seq)
    elapsed = time.perf_counter() - t0
    store.close()
    return elapsed


def build_reads(uri: str, args) -> None:
    store = open_store(uri)
    rng = np.random.default_rng(1)
    for i in range(49):
        make_run(store, f"other{i}")
    make_run(store, "long")
    vals = rng.standard_normal(args.read_points)
    vals[args.read_points // 3] = 1e6  # a one-step spike the buckets must keep
    for lo in range(0, args.read_points, 100_000):
        steps = np.arange(lo, min(lo + 100_000, args.read_points), dtype=np.int64)
        store.points.append("long", 0, 0, {"train/loss": (steps, vals[steps])})
    store.close()


QUERIES = {
    "buckets": lambda s: s.buckets("long", "train/loss", 1000),
    "full": lambda s: s.series("long", "train/loss", rank=0),
    "mean_ranks": lambda s: s.series("ingest", "layers/0/grad_norm"),
    "runs": lambda s: [r["id"] for r in s.runs()],
}


def query(uri: str, name: str) -> tuple[float, object]:
    store = open_store(uri, create=False)
    t0 = time.perf_counter()
    answer = QUERIES[name](store)
    elapsed = time.perf_counter() - t0
    store.close()
    return elapsed, answer


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--flush-steps", type=int, default=50, help="steps per append (one flush of a rank)")
    ap.add_argument("--read-points", type=int, default=1_000_000)
    ap.add_argument("--reads", type=int, default=5)
    args = ap.parse_args()
    for name in ("repeats", "ranks", "keys", "steps", "flush_steps", "read_points", "reads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    server = start_pg_server(durable=True)
    points = args.ranks * args.keys * args.steps
    values = np.random.default_rng(0).standard_normal((args.ranks, args.keys, args.steps))
    try:
        before = machine()
        times: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        for r in range(args.repeats):
            order = ["sqlite", "postgresql"] if r % 2 == 0 else ["postgresql", "sqlite"]
            for backend in order:
                uri = str(work / f"ingest{r}.db") if backend == "sqlite" else server.new_database(f"ingest{r}")
                t = ingest(uri, args, values)
                times[backend].append(t)
                log(f"ingest {backend} #{r}: {points:,} points in {t:.2f}s = {points / t:,.0f} points/s")

        stores = {"sqlite": str(work / "read.db"), "postgresql": server.new_database("read")}
        for uri in stores.values():
            ingest(uri, args, values)
            build_reads(uri, args)
        answers = {b: {q: query(uri, q)[1] for q in QUERIES} for b, uri in stores.items()}
        assert answers["sqlite"]["full"] and answers["sqlite"]["buckets"], "no points read back"
        for q in QUERIES:
            assert answers["sqlite"][q] == answers["postgresql"][q], f"{q}: the backends disagree"
        assert max(p["max"] for p in answers["postgresql"]["buckets"]) == 1e6, "the spike was lost"
        lat: dict[str, dict[str, list[float]]] = {b: {q: [] for q in QUERIES} for b in stores}
        for i in range(args.reads):
            for b in (list(stores) if i % 2 == 0 else list(reversed(stores))):
                for q in QUERIES:
                    lat[b][q].append(query(stores[b], q)[0])
        result: dict = {"points": points, "ranks": args.ranks, "keys": args.keys, "steps": args.steps,
                        "flush_steps": args.flush_steps, "repeats": args.repeats, "read_points": args.read_points}
        for b in stores:
            result[f"{b}_ingest_pps"] = round(points / med(times[b]))
            for q in QUERIES:
                result[f"{b}_{q}_ms"] = round(med(lat[b][q]) * 1000, 2)
                log(f"{q} {b}: median {result[f'{b}_{q}_ms']} ms over {args.reads}")
        result["pg_vs_sqlite_ingest"] = round(result["postgresql_ingest_pps"] / result["sqlite_ingest_pps"], 3)
        for q in QUERIES:
            result[f"pg_vs_sqlite_{q}_time"] = round(result[f"postgresql_{q}_ms"] / max(result[f"sqlite_{q}_ms"], 1e-3), 3)
        result["same_answers"] = True
        result["machine_before"], result["machine_after"] = before, machine()
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
