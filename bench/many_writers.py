"""Many writers at once: `orchestrator server` vs MLflow's tracking server, same senders, same database.

N concurrent senders (64 and 256 by default) are the ranks of several runs (8 ranks a run), spread
over --procs processes of threads. Each sender logs KEYS keys at --steps-per-s steps a second and
flushes every second what it logged since the last flush, then waits for the answer:

  ours      RemoteStore (tracking.uri: http://...) -> `orchestrator server --store DB`: one
            points.append(..., seq=n) per flush, which returns once the server has committed it;
            each sender has a client (channel, connection) of its own, as a process of its own would
  mlflow    MlflowClient().log_batch(...) -> `mlflow server --backend-store-uri DB`, 1,000 metrics a
            call (MLflow's maximum); it returns once the server has committed them

against a SQLite file and (--pg, when PostgreSQL 15 is installed) a PostgreSQL database started
here (initdb + pg_ctl in a temp dir, durable: fsync on, commits not waited for, like SQLite's WAL
with synchronous=NORMAL). Reported per case:

  points_per_s     points acknowledged / (last acknowledgement - start)
  lag_p99_s        p99 over points of (acknowledged - logged): a point is queryable once its batch is
                   committed, before the answer, so this bounds log -> queryable from above. A point
                   is logged uniformly within its flush interval; its lag includes the wait for the flush
  points_stored    counted in the database afterwards; points_dropped = acknowledged - stored
                   (and a duplicate would make it negative); undelivered = logged but not
                   acknowledged within --drain-s after the end (a server that cannot keep up)

    .venv/bin/python bench/many_writers.py [--senders 64,256] [--duration-s 20] [--pg [--no-sqlite]] [--quick]

MLflow runs from its own venv (--mlflow-venv, default /tmp/server-venv with `pip install mlflow
psycopg2-binary`); the senders use the MLflow client installed here (mlflow-skinny). Progress goes
to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

import numpy as np  # noqa: E402

KEYS = 50
RANKS_PER_RUN = 8
FLUSH_S = 1.0
MLFLOW_BATCH_MAX = 1000
TARGET_PPS = 1_000_000
TARGET_VS_MLFLOW = 100.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- one sender process: --role sender ------------------------------------------------------------


def sender_main(args) -> None:
    """Threads, one per rank, in this process; prints one JSON line: per-flush records."""
    ranks = json.loads(args.ranks)  # [[run, rank], ...]
    start, end = args.start, args.start + args.duration_s
    records: list[list] = []  # [t_from, t_to, acked_at, points]
    lock = threading.Lock()
    if args.backend == "ours":
        from orchestrator.remote_store import RemoteStore
    else:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

    def rank_loop(run: str, rank: int) -> None:
        rng = np.random.default_rng(hash((run, rank)) % 2**32)
        if args.backend == "ours":
            client = RemoteStore(args.uri, private=True)  # its own connection, as a rank's process would have
        else:
            client = MlflowClient(args.uri)
        sent_steps, seq = 0, 0

        def note(*record) -> None:
            with lock:
                records.append(list(record))
        t_from = start
        while True:
            now = min(time.time(), end)
            due = int((args.duration_s if now >= end else now - start) * args.steps_per_s)  # steps logged by now
            n_steps = due - sent_steps
            if n_steps > 0:
                steps = np.arange(sent_steps, due, dtype=np.int64)
                if args.backend == "ours":
                    seq += 1
                    cols = {f"m/{k}": (steps, rng.standard_normal(n_steps)) for k in range(KEYS)}
                    client.points.append(run, rank, 0, cols, seq=seq)  # returns once committed
                    note(t_from, now, time.time(), n_steps * KEYS)
                else:  # (key, step) pairs in chunks of MLflow's maximum, built only when sent
                    total = n_steps * KEYS
                    for i in range(0, total, MLFLOW_BATCH_MAX):
                        size = min(MLFLOW_BATCH_MAX, total - i)
                        if time.time() > end + args.drain_s:  # too late: the rest is undelivered
                            break
                        idx = np.arange(i, i + size)
                        vals = rng.standard_normal(size)
                        chunk = [Metric(f"m/{k}/rank{rank}", float(v), int(now * 1000), int(steps[j]))
                                 for k, j, v in zip(idx // n_steps, idx % n_steps, vals, strict=True)]
                        client.log_batch(args.mlflow_runs[run], metrics=chunk, synchronous=True)
                        note(t_from, now, time.time(), size)
                sent_steps = due
            t_from = now
            if now >= end:
                break
            time.sleep(max(0.0, FLUSH_S - (time.time() - now)))
        if args.backend == "ours":
            client.close()

    if args.backend == "mlflow":
        args.mlflow_runs = json.loads(args.mlflow_run_ids)
    threads = [threading.Thread(target=rank_loop, args=(run, rank), daemon=True) for run, rank in ranks]
    wait = args.start - time.time()
    if wait > 0:
        time.sleep(wait)
    for t in threads:
        t.start()
    deadline = end + args.drain_s + 60  # a call still going by then (a client's own retries) is left behind
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    with lock:
        print(json.dumps({"records": records, "alive": sum(t.is_alive() for t in threads)}), flush=True)
    os._exit(0)  # threads stuck in a call would hold the process open


# --- servers ------------------------------------------------------------------------------------------


def wait_http(url: str, deadline_s: float = 300) -> None:
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {deadline_s:g}s")


def start_ours(store: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "ORCHESTRATOR_HOME": str(workdir / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "server", "--port", "0", "--store", store],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        raise RuntimeError(f"orchestrator server did not start: {line}{proc.stderr.read()[-2000:]}")
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return proc, f"http://127.0.0.1:{port}"


def start_mlflow(backend: str, workdir: Path, venv: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_HOME": str(workdir)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([str(venv / "bin" / "mlflow"), "server", "--backend-store-uri", backend,
                             "--default-artifact-root", str(workdir / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port),
                             # its 4 workers, given time to answer uvicorn's health pings on a loaded
                             # machine (after 5 s, the default, uvicorn kills and restarts them)
                             "--uvicorn-opts", "--timeout-worker-healthcheck 120"],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "mlflow-server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health")
        for _ in range(8):  # every worker up and connected to the database before the clock starts
            wait_http(uri + "/api/2.0/mlflow/experiments/search?max_results=1")
    except BaseException:  # it never came up: stop what was started
        stop(proc, group=True)
        raise
    return proc, uri


def stop(proc: subprocess.Popen, *, group: bool = False) -> None:
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(60)


def cpu_seconds(pid: int) -> float:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
        return sum(x.cpu_times().user + x.cpu_times().system for x in procs)
    except psutil.Error:
        return float("nan")


# --- one case -----------------------------------------------------------------------------------------


def layout(senders: int, procs: int) -> list[list[list]]:
    """Ranks of runs, split over processes (whole runs per process where possible)."""
    ranks = [[f"mw-run{i // RANKS_PER_RUN}", i % RANKS_PER_RUN] for i in range(senders)]
    return [ranks[p::procs] for p in range(procs)]


def run_case(*, backend: str, uri: str, senders: int, procs: int, steps_per_s: float, duration_s: float,
             drain_s: float, server_pid: int, mlflow_runs: dict | None = None) -> dict:
    parts = layout(senders, procs)
    start = time.time() + 3.0 + 0.05 * senders  # every process has started its threads by then
    cpu0 = cpu_seconds(server_pid)
    cmds = []
    for part in parts:
        cmd = [sys.executable, __file__, "--role", "sender", "--backend", backend, "--uri", uri,
               "--ranks", json.dumps(part), "--start", repr(start), "--duration-s", str(duration_s),
               "--drain-s", str(drain_s), "--steps-per-s", str(steps_per_s)]
        if mlflow_runs:
            cmd += ["--mlflow-run-ids", json.dumps(mlflow_runs)]
        cmds.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    records, alive = [], 0
    for p in cmds:
        out, err = p.communicate(timeout=duration_s + drain_s + 600)
        if p.returncode != 0:
            raise RuntimeError(f"a sender process failed: {err[-3000:]}")
        got = json.loads(out.strip().splitlines()[-1])
        records += got["records"]
        alive += got["alive"]
    cpu = cpu_seconds(server_pid) - cpu0
    points_acked = int(sum(r[3] for r in records))
    logged = senders * KEYS * int(duration_s * steps_per_s)  # what the senders' ranks logged
    last = max((r[2] for r in records), default=start)
    return {
        "senders": senders, "processes": procs, "keys": KEYS, "steps_per_s": steps_per_s,
        "offered_points_per_s": senders * KEYS * steps_per_s,
        "points_logged": logged, "points_acked": points_acked, "undelivered": logged - points_acked,
        "points_per_s": round(points_acked / max(last - start, 1e-9)),
        "lag_p50_s": round(lag_quantile(records, 0.50), 3), "lag_p99_s": round(lag_quantile(records, 0.99), 3),
        "server_cpu_s": round(cpu, 1), "senders_stuck": alive, "wall_s": round(last - start, 1),
    }


def lag_quantile(records: list, q: float) -> float:
    """Quantile over points of (acked - logged); a flush's points were logged evenly over [t_from, t_to]."""
    if not records:
        return float("nan")
    per = 16  # points sampled per flush, each weighted by its share of the flush
    lags, weights = [], []
    for t_from, t_to, acked, n in records:
        logged = np.linspace(t_from, t_to, per + 2)[1:-1]
        lags.append(acked - logged)
        weights.append(np.full(per, n / per))
    lags, weights = np.concatenate(lags), np.concatenate(weights)
    order = np.argsort(lags)
    cum = np.cumsum(weights[order])
    return float(lags[order][np.searchsorted(cum, q * cum[-1])])


# --- counting what was stored --------------------------------------------------------------------------


def stored_ours(store: str) -> int:
    from orchestrator.store import open_store

    s = open_store(store, create=False)
    try:
        row = s.db.execute("SELECT COALESCE(SUM(n), 0) FROM series WHERE run_id LIKE 'mw-run%'").fetchone()
        return int(row[0])
    finally:
        s.close()


def stored_mlflow(backend: str) -> int:
    if backend.startswith("sqlite:///"):
        import sqlite3

        db = sqlite3.connect(backend[len("sqlite:///"):])
        try:
            return int(db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0])
        finally:
            db.close()
    import psycopg

    with psycopg.connect(backend.replace("postgresql+psycopg2://", "postgresql://")) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0])


def create_ours_runs(uri: str, senders: int) -> None:
    from orchestrator.remote_store import RemoteStore

    r = RemoteStore(uri)
    for run in sorted({run for part in layout(senders, 1) for run, _ in part}):
        r.create_run(run_id=run, name=run, config={"bench": "many_writers"}, git_commit=None, host="bench",
                     command="bench/many_writers.py", world_size=RANKS_PER_RUN)
    r.close()


def create_mlflow_runs(uri: str, senders: int) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.create_experiment(f"many-writers-{senders}-{time.time_ns()}")
    return {run: c.create_run(exp, run_name=run).info.run_id
            for run in sorted({run for part in layout(senders, 1) for run, _ in part})}


# --- main -----------------------------------------------------------------------------------------------


def bench_backend(db: str, kind: str, args, workdir: Path) -> dict:
    """Every sender count against our server, then against MLflow's, on fresh databases of `kind`."""
    out: dict = {}
    for senders in args.senders:
        steps = args.points_per_s / (senders * KEYS)
        for who in ("ours", "mlflow"):
            if who == "mlflow" and args.no_mlflow:
                continue
            case_dir = Path(tempfile.mkdtemp(prefix=f"{who}-{senders}-", dir=workdir))
            store = fresh_db(db, kind, who, senders, case_dir)
            log(f"{kind} {who}: {senders} senders, {steps:g} steps/s x {KEYS} keys each, {args.duration_s:g}s")
            if who == "ours":
                proc, uri = start_ours(store, case_dir)
                try:
                    create_ours_runs(uri, senders)
                    res = run_case(backend="ours", uri=uri, senders=senders, procs=args.procs, steps_per_s=steps,
                                   duration_s=args.duration_s, drain_s=args.drain_s, server_pid=proc.pid)
                finally:
                    stop(proc)
                res["points_stored"] = stored_ours(store)
            else:
                proc, uri = start_mlflow(store, case_dir, Path(args.mlflow_venv))
                try:
                    runs = create_mlflow_runs(uri, senders)
                    res = run_case(backend="mlflow", uri=uri, senders=senders, procs=args.procs, steps_per_s=steps,
                                   duration_s=args.duration_s, drain_s=args.drain_s, server_pid=proc.pid,
                                   mlflow_runs=runs)
                finally:
                    stop(proc, group=True)
                res["points_stored"] = stored_mlflow(store)
                text = (case_dir / "mlflow-server.log").read_text(errors="replace")
                res["server_log_errors"] = sum(1 for line in text.splitlines()
                                               if any(w in line for w in ("locked", "Error", " 500 ", "died")))
            res["points_dropped"] = res["points_acked"] - res["points_stored"]
            log(f"  -> {res['points_per_s']:,} points/s, lag p99 {res['lag_p99_s']}s, acked {res['points_acked']:,},"
                f" stored {res['points_stored']:,}, undelivered {res['undelivered']:,}, server CPU {res['server_cpu_s']}s")
            out.setdefault(str(senders), {})[who] = res
            shutil.rmtree(case_dir, ignore_errors=True)
        case = out[str(senders)]
        if "mlflow" in case and case["mlflow"]["points_per_s"]:
            case["ours_vs_mlflow"] = round(case["ours"]["points_per_s"] / case["mlflow"]["points_per_s"], 1)
    return out


def fresh_db(db, kind: str, who: str, senders: int, case_dir: Path) -> str:
    if kind == "sqlite":
        return str(case_dir / "store.db") if who == "ours" else f"sqlite:///{case_dir / 'mlflow.db'}"
    uri = db.new_database(prefix=f"{who}{senders}")
    return uri if who == "ours" else uri.replace("postgresql://", "postgresql+psycopg2://")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", default="main", choices=["main", "sender"])
    p.add_argument("--senders", default="64,256", help="comma-separated sender counts")
    p.add_argument("--procs", type=int, default=4, help="sender processes (threads share the rest)")
    p.add_argument("--points-per-s", type=float, default=1_200_000, help="offered load, all senders together")
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--drain-s", type=float, default=30.0, help="after the end, how long acknowledgements may take")
    p.add_argument("--pg", action="store_true", help="also on PostgreSQL (started here)")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only (with --pg): a shorter run")
    p.add_argument("--mlflow-venv", default="/tmp/server-venv")
    p.add_argument("--quick", action="store_true", help="64 senders, 8 s")
    # sender role
    for a in ("--backend", "--uri", "--ranks", "--mlflow-run-ids"):
        p.add_argument(a)
    p.add_argument("--start", type=float)
    p.add_argument("--steps-per-s", type=float)
    args = p.parse_args()
    if args.role == "sender":
        return sender_main(args)
    if args.quick:
        args.senders, args.duration_s = "64", 8.0
    args.senders = [int(x) for x in str(args.senders).split(",")]
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="many-writers-"))
    result: dict = {"bench": "many_writers", "keys": KEYS, "flush_s": FLUSH_S, "duration_s": args.duration_s,
                    "load_before": [round(x, 1) for x in load_before]}
    try:
        if not args.no_sqlite:
            result["sqlite"] = bench_backend(None, "sqlite", args, workdir)
        if args.pg:
            from tests.pg_server import start_pg_server

            pg = start_pg_server(durable=True)
            try:
                result["postgresql"] = bench_backend(pg, "postgresql", args, workdir)
            finally:
                pg.stop()
                shutil.rmtree(pg.folder, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["load_after"] = [round(x, 1) for x in os.getloadavg()]
    try:
        from benchlib import git_state, machine

        result["machine"] = machine()
        result["git"] = git_state()
    except Exception as e:  # not worth losing the figures over
        result["machine"] = {"error": str(e)}
    targets = {}
    for kind in ("sqlite", "postgresql"):
        for senders, case in result.get(kind, {}).items():
            targets[f"{kind}_{senders}_ours_1M_pps"] = case["ours"]["points_per_s"] >= TARGET_PPS
            targets[f"{kind}_{senders}_nothing_dropped"] = case["ours"]["points_dropped"] == 0
            if "ours_vs_mlflow" in case:
                targets[f"{kind}_{senders}_100x_mlflow"] = case["ours_vs_mlflow"] >= TARGET_VS_MLFLOW
    result["targets_met"] = targets
    print(json.dumps(finite(result), allow_nan=False))


def finite(x):
    """NaN (no acknowledged point, say) as null: the last line is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


if __name__ == "__main__":
    main()
