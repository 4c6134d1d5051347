"""Our tracking store vs MLflow (SQLite backend), side by side in one run, on the same points.

Ingest (points/s, median over --repeats; the same KEYS x STEPS values for everyone):
  ours_actor_driver   a MetricSender on the driver calls .log({KEYS keys}, step=s) per step, then
                      .close(); a ray.remote(MetricsActor) writes to SQLite. Timed from the first
                      log() to close() returning, i.e. until every batch is acknowledged and stored.
  ours_actor_task     the same, with the sender inside a Ray task acting as a rank (its own process).
  ours_store_only     store.points.append() directly (no Ray, no sender), batches of --store-batch-steps.
  mlflow_log_batch    MlflowClient().log_batch(run_id, metrics=[Metric...]) per step, 1,000 metrics
                      per call (MLflow's maximum), on the first --mlflow-steps steps of the same points.
  mlflow_async        mlflow.log_metrics(..., synchronous=False) per step, then flush_async_logging().
Read:
  ours                a --read-points single series (built with store.points.append) downsampled to
                      1,000 buckets with store.buckets(...): first read on a new connection, then the
                      median of --reads reads. Checked: the bucket counts add up and the spikes survive.
  mlflow              get_metric_history() of a --mlflow-read-points series built with log_batch, plus
                      downsampling its result in numpy to the same min/max/first/last buckets.

    .venv/bin/python bench/tracking_store.py [--repeats 3] [--keys 1000] [--steps 1000] [--quick]

Needs MLflow for the peer half (`pip install mlflow`); without it that half is skipped. Progress goes
to stderr; the last stdout line is one JSON object with every median.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# before anything imports ray: keep the embedded cluster on loopback, no usage stats
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)  # always the embedded cluster
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

import numpy as np  # noqa: E402

TARGET_INGEST_PPS = 1_000_000
TARGET_READ_MS = 100.0
TARGET_VS_MLFLOW = 100.0
MLFLOW_BATCH_MAX = 1000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- the points -----------------------------------------------------------------------------

def key_names(n: int) -> list[str]:
    base = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s"]
    return (base + [f"grad_norm/layer{i:04d}" for i in range(n)])[:n]


def value_matrix(steps: int, keys: int, seed: int = 0) -> np.ndarray:
    """(steps, keys) smooth values with a little noise (no spikes: the anomaly detector stays quiet,
    as in a healthy run)."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)[:, None]
    scale = rng.uniform(0.5, 2.0, size=(1, keys))
    return scale * (1.0 + np.exp(-t / max(steps, 1))) + 1e-3 * rng.standard_normal((steps, keys))


def step_dicts(steps: int, keys: int) -> list[dict[str, float]]:
    """What a training loop hands to log() every step: {key: float}."""
    names = key_names(keys)
    vals = value_matrix(steps, keys).tolist()
    return [dict(zip(names, row, strict=True)) for row in vals]


# --- ours ------------------------------------------------------------------------------------

def stored_points(store_root: str, run_id: str) -> int:
    db = sqlite3.connect(Path(store_root) / "store.db", timeout=30)
    try:
        return int(db.execute("SELECT COALESCE(SUM(n), 0) FROM series WHERE run_id = ?", (run_id,)).fetchone()[0])
    finally:
        db.close()


def _send_all(actor, dicts: list[dict[str, float]], flush_every_s: float) -> dict:
    """A rank's side: log every step, then close (everything acknowledged by the actor)."""
    from actors.metric_sender import MetricSender

    sender = MetricSender(actor, 0, flush_every_s=flush_every_s)
    t0 = time.perf_counter()
    for step, d in enumerate(dicts):
        sender.log(d, step=step)
    t_logged = time.perf_counter()
    sender.close()
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "log_loop_s": t_logged - t0, "batches": sender.seq,
            "sent": sender.sent_points, "dropped": sender.dropped_points}


def rank_task(actor, steps: int, keys: int, flush_every_s: float) -> dict:
    """Body of the Ray task that acts as a rank: builds the same points, then sends them."""
    return _send_all(actor, step_dicts(steps, keys), flush_every_s)


def ours_actor(ray, store_root: str, dicts, args, where: str) -> dict:
    from actors.metrics_actor import MetricsActor
    from orchestrator.anomaly import AnomalyDetector
    from orchestrator.store import Store

    run_id = f"ingest-{where}-{uuid.uuid4().hex[:8]}"
    store = Store(store_root)
    store.create_run(run_id=run_id, name=run_id, config={}, git_commit=None, host="h", command="c", world_size=1)
    store.close()
    actor = ray.remote(MetricsActor).remote(run_id, store_root, open_store=Store, detector=AnomalyDetector())
    ray.get(actor.progress.remote())  # started and its store opened: not part of the timing
    if where == "driver":
        r = _send_all(actor, dicts, args.flush_every_s)
    else:
        task = ray.remote(num_cpus=1)(rank_task)
        r = ray.get(task.remote(actor, args.steps, args.keys, args.flush_every_s))
    ray.get(actor.close.remote())
    ray.kill(actor)
    n = args.steps * args.keys
    got = stored_points(store_root, run_id)
    if got != n or r["dropped"]:
        raise RuntimeError(f"ours ({where}): {got} points in SQLite, {r['dropped']} dropped; expected {n}")
    r["pps"] = n / r["seconds"]
    return r


def ours_store_only(store_root: str, args) -> dict:
    from orchestrator.store import Store

    names = key_names(args.keys)
    vals = value_matrix(args.steps, args.keys)
    all_steps = np.arange(args.steps, dtype=np.int64)
    b = args.store_batch_steps
    batches = [
        {k: (all_steps[lo:lo + b].copy(), np.ascontiguousarray(vals[lo:lo + b, i])) for i, k in enumerate(names)}
        for lo in range(0, args.steps, b)
    ]
    run_id = f"store-{uuid.uuid4().hex[:8]}"
    store = Store(store_root)
    store.create_run(run_id=run_id, name=run_id, config={}, git_commit=None, host="h", command="c", world_size=1)
    t0 = time.perf_counter()
    for seq, cols in enumerate(batches, 1):
        store.points.append(run_id, 0, 0, cols, seq=seq)
    dt = time.perf_counter() - t0
    store.close()
    n = args.steps * args.keys
    got = stored_points(store_root, run_id)
    if got != n:
        raise RuntimeError(f"ours (store only): {got} points in SQLite, expected {n}")
    return {"seconds": dt, "pps": n / dt, "batches": len(batches)}


def long_series(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A loss-like curve with a handful of one-point spikes (which a downsampled read must keep)."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n, dtype=np.int64)
    vals = 2.0 + np.exp(-steps / max(n / 5, 1)) + 0.01 * rng.standard_normal(n)
    spikes = rng.choice(n, size=min(8, n), replace=False)
    vals[spikes] = 50.0 + np.arange(len(spikes))
    return steps, vals, spikes


def ours_read(store_root: str, args) -> dict:
    from orchestrator.store import Store

    n = args.read_points
    steps, vals, spikes = long_series(n)
    run_id = f"read-{uuid.uuid4().hex[:8]}"
    store = Store(store_root)
    store.create_run(run_id=run_id, name=run_id, config={}, git_commit=None, host="h", command="c", world_size=1)
    b = args.read_batch
    t0 = time.perf_counter()
    for seq, lo in enumerate(range(0, n, b), 1):
        store.points.append(run_id, 0, 0, {"train/loss": (steps[lo:lo + b], vals[lo:lo + b])}, seq=seq)
    build_s = time.perf_counter() - t0
    store.close()
    log(f"  ours: built a {n:,}-point series in {build_s:.1f}s ({n / build_s:,.0f} points/s, batches of {b:,})")

    store = Store(store_root)  # a new connection, as the CLI / UI would open
    t0 = time.perf_counter()
    rows = store.buckets(run_id, "train/loss", args.buckets, rank=0)
    first_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(args.reads):
        t0 = time.perf_counter()
        rows = store.buckets(run_id, "train/loss", args.buckets, rank=0)
        times.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    full = store.rank_points(run_id, "train/loss", 0)  # full resolution, as numpy columns
    full_ms = (time.perf_counter() - t0) * 1e3
    store.close()
    counts = sum(r["count"] for r in rows)
    kept = sorted(round(r["max"], 6) for r in rows if r["max"] >= 50.0)
    ok = (len(rows) <= args.buckets and counts == n and kept == sorted(round(float(v), 6) for v in vals[spikes])
          and len(full.steps) == n)
    if not ok:
        raise RuntimeError(f"ours read: {len(rows)} buckets, {counts} points counted, spikes kept {kept}")
    return {"points": n, "buckets": len(rows), "build_s": build_s, "first_read_ms": first_ms,
            "read_ms_median": med(times), "read_ms_all": times, "full_resolution_numpy_ms": full_ms}


# --- MLflow ----------------------------------------------------------------------------------

def mlflow_setup(work: Path):
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError:
        return None
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    db = work / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = MlflowClient()
    exp = client.create_experiment("bench", artifact_location=str(work / "mlartifacts"))
    return mlflow, client, exp, db


def mlflow_count(db: Path, run_id: str) -> int:
    c = sqlite3.connect(db, timeout=30)
    try:
        return int(c.execute("SELECT COUNT(*) FROM metrics WHERE run_uuid = ?", (run_id,)).fetchone()[0])
    finally:
        c.close()


def mlflow_log_batch(ml, dicts: list[dict[str, float]]) -> dict:
    from mlflow.entities import Metric

    _, client, exp, db = ml
    run_id = client.create_run(exp).info.run_id
    ts = int(time.time() * 1000)
    t0 = time.perf_counter()
    for step, d in enumerate(dicts):
        items = list(d.items())
        for lo in range(0, len(items), MLFLOW_BATCH_MAX):
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in items[lo:lo + MLFLOW_BATCH_MAX]])
    dt = time.perf_counter() - t0
    n = sum(len(d) for d in dicts)
    got = mlflow_count(db, run_id)
    if got != n:
        raise RuntimeError(f"mlflow log_batch: {got} points stored, expected {n}")
    return {"seconds": dt, "pps": n / dt, "points": n}


def mlflow_async(ml, dicts: list[dict[str, float]]) -> dict:
    mlflow, client, exp, db = ml
    run_id = client.create_run(exp).info.run_id
    t0 = time.perf_counter()
    for step, d in enumerate(dicts):
        mlflow.log_metrics(d, step=step, synchronous=False, run_id=run_id)
    t_logged = time.perf_counter()
    mlflow.flush_async_logging()
    dt = time.perf_counter() - t0
    n = sum(len(d) for d in dicts)
    got = mlflow_count(db, run_id)
    if got != n:
        raise RuntimeError(f"mlflow async: {got} points stored, expected {n}")
    return {"seconds": dt, "pps": n / dt, "points": n, "log_loop_s": t_logged - t0}


def downsample_np(steps: np.ndarray, vals: np.ndarray, buckets: int) -> dict[str, np.ndarray]:
    """min/max/first/last/mean per bucket of equal step width (what a chart of MLflow's data needs)."""
    edges = steps[0] + (np.arange(buckets + 1, dtype=np.int64) * (steps[-1] - steps[0] + 1)) // buckets
    idx = np.searchsorted(edges, steps, side="right") - 1
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    ends = np.r_[starts[1:], len(idx)] - 1
    counts = ends - starts + 1
    return {"step": steps[starts], "min": np.minimum.reduceat(vals, starts), "max": np.maximum.reduceat(vals, starts),
            "first": vals[starts], "last": vals[ends], "mean": np.add.reduceat(vals, starts) / counts}


def mlflow_read(ml, args) -> dict:
    from mlflow.entities import Metric

    _, client, exp, db = ml
    n = args.mlflow_read_points
    steps, vals, spikes = long_series(n)
    run_id = client.create_run(exp).info.run_id
    ts = int(time.time() * 1000)
    t0 = time.perf_counter()
    for lo in range(0, n, MLFLOW_BATCH_MAX):
        client.log_batch(run_id, metrics=[Metric("train/loss", float(v), ts, int(s))
                                          for s, v in zip(steps[lo:lo + MLFLOW_BATCH_MAX].tolist(),
                                                          vals[lo:lo + MLFLOW_BATCH_MAX].tolist(), strict=True)])
    build_s = time.perf_counter() - t0
    log(f"  mlflow: built a {n:,}-point series with log_batch in {build_s:.1f}s ({n / build_s:,.0f} points/s)")
    hist_ms, total_ms = [], []
    for _ in range(args.mlflow_reads):
        t0 = time.perf_counter()
        hist = client.get_metric_history(run_id, "train/loss")
        t1 = time.perf_counter()
        hist.sort(key=lambda m: m.step)
        s = np.fromiter((m.step for m in hist), dtype=np.int64, count=len(hist))
        v = np.fromiter((m.value for m in hist), dtype=np.float64, count=len(hist))
        agg = downsample_np(s, v, args.buckets)
        t2 = time.perf_counter()
        hist_ms.append((t1 - t0) * 1e3)
        total_ms.append((t2 - t0) * 1e3)
    if len(hist) != n or np.sort(agg["max"])[-len(spikes):].min() < 50.0:
        raise RuntimeError(f"mlflow read: {len(hist)} points returned, expected {n}")
    return {"points": n, "build_s": build_s, "get_metric_history_ms_median": med(hist_ms),
            "read_and_downsample_ms_median": med(total_ms), "read_and_downsample_ms_all": total_ms}


# --- main ------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": round(mem_gb, 1), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1000, help="metric keys logged every step")
    ap.add_argument("--steps", type=int, default=1000, help="steps (points = keys x steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flush-every-s", type=float, default=1.0, help="MetricSender flush interval (config default)")
    ap.add_argument("--store-batch-steps", type=int, default=100, help="steps per store.points.append (store only)")
    ap.add_argument("--mlflow-steps", type=int, default=50, help="steps of the same points MLflow ingests per repeat")
    ap.add_argument("--read-points", type=int, default=10_000_000)
    ap.add_argument("--read-batch", type=int, default=100_000, help="points per append when building the series")
    ap.add_argument("--reads", type=int, default=10)
    ap.add_argument("--buckets", type=int, default=1000)
    ap.add_argument("--mlflow-read-points", type=int, default=100_000)
    ap.add_argument("--mlflow-reads", type=int, default=3)
    ap.add_argument("--no-mlflow", action="store_true", help="skip the MLflow half")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (not for the record)")
    args = ap.parse_args()
    if args.quick:
        args.keys, args.steps, args.repeats, args.mlflow_steps = 200, 100, 1, 5
        args.read_points, args.mlflow_read_points, args.reads, args.mlflow_reads = 1_000_000, 5_000, 3, 1

    work = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    out: dict = {"bench": "tracking_store", "machine": machine(), "params": {
        k: getattr(args, k) for k in ("keys", "steps", "repeats", "flush_every_s", "store_batch_steps", "mlflow_steps",
                                      "read_points", "read_batch", "reads", "buckets", "mlflow_read_points",
                                      "mlflow_reads")}}
    try:
        ml = None
        if not args.no_mlflow:
            ml = mlflow_setup(work / "mlflow")
            if ml is None:
                log("mlflow is not importable: skipping the MLflow half (to compare: pip install mlflow)")
        import ray

        out["versions"] = {"ray": ray.__version__, "numpy": np.__version__,
                           "mlflow": ml[0].__version__ if ml else None}
        n = args.keys * args.steps
        log(f"building {args.steps} steps x {args.keys} keys = {n:,} points")
        dicts = step_dicts(args.steps, args.keys)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
        res: dict[str, list[dict]] = {k: [] for k in ("ours_actor_driver", "ours_actor_task", "ours_store_only",
                                                      "mlflow_log_batch", "mlflow_async")}
        ours_root = str(work / "ours")
        for rep in range(args.repeats):  # interleaved, so a noisy moment hits every contender
            for where in ("driver", "task"):
                r = ours_actor(ray, ours_root, dicts, args, where)
                res[f"ours_actor_{where}"].append(r)
                log(f"rep {rep + 1}/{args.repeats} ours via actor, sender on {where}: {r['pps']:,.0f} points/s "
                    f"({r['seconds']:.2f}s, log loop {r['log_loop_s']:.2f}s, {r['batches']} batches)")
            r = ours_store_only(str(work / "ours-store"), args)
            res["ours_store_only"].append(r)
            log(f"rep {rep + 1}/{args.repeats} ours store.points.append only: {r['pps']:,.0f} points/s ({r['seconds']:.2f}s)")
            if ml:
                sub = dicts[: args.mlflow_steps]
                r = mlflow_log_batch(ml, sub)
                res["mlflow_log_batch"].append(r)
                log(f"rep {rep + 1}/{args.repeats} mlflow log_batch: {r['pps']:,.0f} points/s "
                    f"({r['points']:,} points in {r['seconds']:.2f}s)")
                r = mlflow_async(ml, sub)
                res["mlflow_async"].append(r)
                log(f"rep {rep + 1}/{args.repeats} mlflow log_metrics(synchronous=False): {r['pps']:,.0f} points/s "
                    f"({r['points']:,} points in {r['seconds']:.2f}s, log loop {r['log_loop_s']:.2f}s)")
        ray.shutdown()

        ingest = {"points_ours": n, "points_mlflow": args.mlflow_steps * args.keys if ml else None}
        for k, rs in res.items():
            if rs:
                ingest[f"{k}_pps"] = med([r["pps"] for r in rs])
                ingest[f"{k}_pps_all"] = [round(r["pps"]) for r in rs]
        if res["mlflow_async"]:
            ingest["mlflow_async_log_loop_s"] = med([r["log_loop_s"] for r in res["mlflow_async"]])
        for where in ("driver", "task"):
            ingest[f"ours_actor_{where}_log_loop_s"] = med([r["log_loop_s"] for r in res[f"ours_actor_{where}"]])
            ingest[f"ours_actor_{where}_batches"] = med([r["batches"] for r in res[f"ours_actor_{where}"]])
        out["ingest"] = ingest

        log(f"read: {args.read_points:,}-point series -> {args.buckets} buckets")
        read = {"ours": ours_read(str(work / "ours-read"), args)}
        log(f"  ours: first read {read['ours']['first_read_ms']:.1f} ms, median {read['ours']['read_ms_median']:.1f} ms")
        if ml:
            read["mlflow"] = mlflow_read(ml, args)
            log(f"  mlflow: get_metric_history {read['mlflow']['get_metric_history_ms_median']:.0f} ms, "
                f"+ numpy downsample {read['mlflow']['read_and_downsample_ms_median']:.0f} ms "
                f"({args.mlflow_read_points:,} points)")
        out["read"] = read

        ours_pps = min(ingest["ours_actor_driver_pps"], ingest["ours_actor_task_pps"])
        ours_ms = read["ours"]["read_ms_median"]
        t = {"ingest_pps_through_actor": ours_pps, "ingest_target_pps": TARGET_INGEST_PPS,
             "ingest_met": ours_pps >= TARGET_INGEST_PPS, "read_ms": ours_ms, "read_target_ms": TARGET_READ_MS,
             "read_met": ours_ms < TARGET_READ_MS and args.read_points >= 10_000_000}
        if ml:
            best_ml = max(ingest["mlflow_log_batch_pps"], ingest["mlflow_async_pps"])
            t["vs_mlflow_best_ingest"] = ours_pps / best_ml
            t["vs_mlflow_log_batch"] = ours_pps / ingest["mlflow_log_batch_pps"]
            t["vs_mlflow_async"] = ours_pps / ingest["mlflow_async_pps"]
            t["vs_mlflow_target"] = TARGET_VS_MLFLOW
            t["vs_mlflow_met"] = t["vs_mlflow_best_ingest"] >= TARGET_VS_MLFLOW
            mr = read["mlflow"]
            t["read_mlflow_ms"] = mr["read_and_downsample_ms_median"]
            t["read_mlflow_points"] = mr["points"]
            t["read_speedup_vs_mlflow"] = mr["read_and_downsample_ms_median"] / ours_ms
            t["read_points_ratio"] = args.read_points / mr["points"]
            # linear in points (MLflow returns one object per point): an estimate, not a measurement
            t["read_mlflow_ms_extrapolated_to_ours"] = mr["read_and_downsample_ms_median"] * args.read_points / mr["points"]
        out["targets"] = t
        log(f"ingest through the actor {ours_pps:,.0f} points/s (target {TARGET_INGEST_PPS:,}); read {ours_ms:.1f} ms "
            f"(target < {TARGET_READ_MS:.0f})" + (f"; {t['vs_mlflow_best_ingest']:.0f}x MLflow's best ingest" if ml else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
