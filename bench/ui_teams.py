"""The web UI on a PostgreSQL store against the same UI on SQLite (and, with --mlflow-venv, MLflow's
own UI): the same 1,001 runs and the same 10,000,000-point series with a one-step spike, measured
side by side in one run in the same headless Chromium.

bench/ui_responsiveness.py builds the SQLite store (1,000 runs of 2 ranks x 500 steps) and measures
one browser pass; here the run "big" gets a 10M-point train/loss (the same curve as there) with one
step raised by SPIKE. The store is copied into a PostgreSQL database (Debian's postgresql 15,
started here as tests/pg_server.py does; durable: fsync on, commits not waited for) with `orchestrator
store copy`'s copy_run; both are served at once, and the passes alternate (the order rotates each
round) so machine noise falls on all alike:

  runs_table_ms   runs page load until the 1,001-run table is drawn
  run_chart_ms    run page load until the 10M-point train/loss chart has drawn
  zoom_in_ms      "+" until redrawn from the server;  zoom_drag_ms  an 8 px drag-select until redrawn
  api_*_ms        the JSON requests behind them over urllib (runs: cold = first after start;
                  uncached = the whole runs table computed anew, its cache emptied)
  spike_visible   whether the data the chart was sent holds the spike

MLflow (--mlflow-venv: a venv with the full `mlflow` package, which serves its UI): `mlflow server`
on a SQLite file; the same points are written straight into its `metrics` table (its client logs
~2k points/s here: over an hour for 10M), the last one through its REST API so the run lists the
metric. Its run page's "Model metrics" tab is timed from load until the chart's line is drawn.

Each figure is the median over the rounds; `pg_over_sqlite` gives PostgreSQL's median / SQLite's.
Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import git_state, machine  # noqa: E402
from ui_responsiveness import ARGS, CHROMIUM, WAIT_MS, build, log, measure_browser, timed_get  # noqa: E402

from orchestrator.store import Store, open_store  # noqa: E402
from orchestrator.store_cli import copy_run  # noqa: E402
from orchestrator.ui.server import start_in_thread  # noqa: E402
from tests.pg_server import start_pg_server  # noqa: E402

BROWSER_KEYS = ("runs_table_ms", "run_chart_ms", "zoom_in_ms", "zoom_drag_ms")
SPIKE = 50.0  # added to one step's loss (~2): a one-step spike any chart of the whole run should show
KEY = "train/loss"
MLFLOW_WAIT_MS = 300_000  # MLflow's chart not drawn by then: recorded as not drawn (None)


def big_series(points: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The 10M-point loss curve of ui_responsiveness.build, with one step raised by SPIKE."""
    steps = np.arange(points, dtype=np.int64)
    rng = np.random.default_rng(0)
    vals = 2 + 3 * np.exp(-steps / 2e6) + rng.normal(0, 0.05, points)
    spike_step = points * 2 // 3 + 1234
    vals[spike_step] += SPIKE
    return steps, vals, spike_step


def build_store(root: Path, runs: int, steps: np.ndarray, vals: np.ndarray) -> None:
    build(root, runs, 0)  # the 1,000 runs and an empty "big"
    store = Store(root)
    try:
        for lo in range(0, len(steps), 1_000_000):
            store.points.append("big", 0, 0, {KEY: (steps[lo:lo + 1_000_000], vals[lo:lo + 1_000_000])})
    finally:
        store.close()


def api_figures(url: str, server) -> dict[str, float]:
    """The JSON requests the two pages make (the runs one first: the cold figure, which races the
    server's own warm-up of the runs table). uncached: the whole runs table computed anew (the
    server's per-series cache emptied first, as after a restart), with nothing else running."""
    metric = url + f"api/run/big/metric?key={KEY}&buckets=1000"

    def uncached() -> float:
        server.api._stats.clear()  # the bench reaches in: no server option empties it
        return timed_get(url + "api/runs")

    return {
        "api_runs_cold_ms": timed_get(url + "api/runs"),
        "api_runs_warm_ms": statistics.median(timed_get(url + "api/runs") for _ in range(5)),
        "api_runs_uncached_ms": statistics.median(uncached() for _ in range(5)),
        "api_chart_10M_ms": statistics.median(timed_get(metric) for _ in range(5)),
        "api_zoom_half_10M_ms": statistics.median(
            timed_get(metric + f"&lo={i * 100_000}&hi={i * 100_000 + 5_000_000}") for i in range(5)),
        "api_zoom_full_res_ms": statistics.median(
            timed_get(metric + f"&lo={i * 777_777}&hi={i * 777_777 + 999}") for i in range(5)),
    }


def our_spike_visible(url: str, spike_value: float) -> bool:
    """What our run page's chart is sent for the whole run (1,000 buckets, each with its max)."""
    with urllib.request.urlopen(url + f"api/run/big/metric?key={KEY}&buckets=1000", timeout=120) as r:
        points = json.loads(r.read())["points"]
    return bool(points) and max(p["max"] for p in points if p["max"] is not None) >= spike_value - 1e-9


def copy_all(src_root: Path, dst_uri: str) -> dict[str, float]:
    src, dst = open_store(str(src_root), create=False), open_store(dst_uri)
    try:
        t = time.perf_counter()
        points = sum(copy_run(src, dst, r["id"])["points"] for r in src.runs())
        took = time.perf_counter() - t
    finally:
        src.close()
        dst.close()
    return {"copy_s": round(took, 1), "copy_points": points}


# --- MLflow's UI (the peer) --------------------------------------------------------------------


class MlflowUi:
    """`mlflow server` from its own venv on a SQLite file, holding the same 10M-point run."""

    def __init__(self, venv: Path, folder: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.db = folder / "mlflow.db"
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db}", "--host",
             "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=open(folder / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    said = (folder / "mlflow.log").read_text()[-2000:]
                    raise RuntimeError(f"mlflow server did not start: {said}") from None
                time.sleep(1)
        self.exp = self.run = ""

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{self.base}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def load(self, steps: np.ndarray, vals: np.ndarray) -> float:
        """The run, its points straight into MLflow's metrics table, the last through its API. Seconds."""
        t = time.perf_counter()
        self.exp = self._post("experiments/create", {"name": "ui-bench"})["experiment_id"]
        self.run = self._post("runs/create", {"experiment_id": self.exp, "run_name": "ten-million"})["run"]["info"]["run_id"]
        stamps = 1_700_000_000_000 + steps  # milliseconds, one per step
        db = sqlite3.connect(self.db, timeout=60)
        try:
            db.execute("PRAGMA synchronous=OFF")  # a bulk load: the bench throws the file away
            n = len(steps) - 1
            for lo in range(0, n, 1_000_000):
                hi = min(n, lo + 1_000_000)
                db.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan)"
                               " VALUES (?, ?, ?, ?, ?, 0)",
                               zip([KEY] * (hi - lo), vals[lo:hi].tolist(), stamps[lo:hi].tolist(),
                                   [self.run] * (hi - lo), steps[lo:hi].tolist(), strict=True))
                db.commit()
        finally:
            db.close()
        self._post("runs/log-metric", {"run_id": self.run, "key": KEY, "value": float(vals[-1]),
                                       "timestamp": int(stamps[-1]), "step": int(steps[-1])})
        return time.perf_counter() - t

    def measure(self, i: int, spike_value: float) -> dict:
        """One browser: MLflow's start page (its scripts cached, as ours are after the runs page),
        then the run's metric charts, timed from load until the line is drawn."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright

        fetched: list = []  # the chart's data requests (read after the wait, not inside the event)

        def keep(response) -> None:
            if "get-history-bulk-interval" in response.url:
                fetched.append(response)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=WAIT_MS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(WAIT_MS)
            page.goto(f"{self.base}/?r={i}#/")  # (it polls: never network-idle) until its app has drawn
            page.wait_for_function("() => (document.getElementById('root') || {childElementCount: 0})"
                                   ".childElementCount > 0 && document.body.innerText.length > 100")
            page.on("response", keep)
            t = time.perf_counter()
            page.goto(f"{self.base}/?r={i}x#/experiments/{self.exp}/runs/{self.run}/model-metrics")
            try:
                page.wait_for_function("""() => [...document.querySelectorAll('.js-plotly-plot path.js-line')]
                                          .some(p => (p.getAttribute('d') || '').length > 100)""", polling="raf",
                                       timeout=MLFLOW_WAIT_MS)
                took = (time.perf_counter() - t) * 1000
            except PlaywrightTimeout:
                took = None
            answers = [r.json().get("metrics", []) for r in fetched if r.status == 200]
            version = browser.version
            browser.close()
        points = answers[-1] if answers else []
        return {"run_chart_ms": took, "points_sent": len(points), "chromium": version,
                "spike_visible": bool(points) and max(m["value"] for m in points) >= spike_value - 1e-9}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its worker
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(60)


# --- the run ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--points", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=5, help="browser passes per backend, in rotating order")
    ap.add_argument("--mlflow-venv", type=Path, help="a venv with the full mlflow package: measure its UI too")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ui-teams-"))
    pg = start_pg_server(durable=True)
    servers, handles, stores, mlflow, result = {}, {}, [], None, {}
    try:
        steps, vals, spike_step = big_series(args.points)
        spike_value = float(vals[spike_step])
        t = time.perf_counter()
        build_store(tmp, args.runs, steps, vals)
        log(f"SQLite store built in {time.perf_counter() - t:.1f}s ({(tmp / 'store.db').stat().st_size / 1e6:.0f} MB)")
        pg_uri = pg.new_database("ui")
        result.update(copy_all(tmp, pg_uri))
        log(f"copied to PostgreSQL: {result}")
        for name, uri in (("sqlite", str(tmp)), ("postgresql", pg_uri)):
            store = open_store(uri)
            stores.append(store)
            server, _ = start_in_thread(store=store, port=0)
            servers[name] = f"http://127.0.0.1:{server.server_address[1]}/"
            stores.append(server)
            handles[name] = server
        api = {name: api_figures(url, handles[name]) for name, url in servers.items()}
        spikes = {name: our_spike_visible(url, spike_value) for name, url in servers.items()}
        log(json.dumps({n: {k: round(v, 1) for k, v in a.items()} for n, a in api.items()}))
        if args.mlflow_venv:
            mlflow = MlflowUi(args.mlflow_venv, tmp)
            result["mlflow_load_s"] = round(mlflow.load(steps, vals), 1)
            log(f"MLflow's store loaded in {result['mlflow_load_s']}s")
        names = [*servers, *(["mlflow"] if mlflow else [])]
        passes: dict[str, dict[str, list]] = {n: {} for n in names}
        chromium = ""
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                if name == "mlflow":
                    got = mlflow.measure(i, spike_value)
                    values = {k: [got[k]] for k in ("run_chart_ms", "points_sent", "spike_visible")}
                else:
                    got = measure_browser(servers[name], args.runs, 1)
                    values = {k: got["all"][k] for k in BROWSER_KEYS}
                chromium = got["chromium"]
                for k, v in values.items():
                    passes[name].setdefault(k, []).extend(v)
                log(f"round {i} {name}: {json.dumps({k: v[-1] for k, v in values.items()})}")
    finally:
        for thing in stores:
            if hasattr(thing, "shutdown"):
                thing.shutdown()
                thing.server_close()
            else:
                thing.close()
        if mlflow is not None:
            mlflow.stop()
        pg.stop()
        shutil.rmtree(pg.folder, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"runs": args.runs + 1, "series_points": args.points, "spike_step": spike_step, "rounds": args.rounds,
              **result}
    for name in servers:
        result[name] = {**{k: round(v, 1) for k, v in api[name].items()},
                        **{k: round(statistics.median(v), 1) for k, v in passes[name].items()},
                        "spike_visible": spikes[name],
                        "all": {k: [round(x) for x in v] for k, v in passes[name].items()}}
    if mlflow is not None:
        m = passes["mlflow"]
        drawn = [x for x in m["run_chart_ms"] if x is not None]
        result["mlflow"] = {"run_chart_ms": round(statistics.median(drawn), 1) if drawn else None,
                            "not_drawn_within_s": [MLFLOW_WAIT_MS / 1000, len(m["run_chart_ms"]) - len(drawn)],
                            "points_sent": m["points_sent"], "spike_visible": m["spike_visible"],
                            "all": {"run_chart_ms": [None if x is None else round(x) for x in m["run_chart_ms"]]}}
    keys = [*api["sqlite"], *BROWSER_KEYS]
    result["pg_over_sqlite"] = {k: round(result["postgresql"][k] / result["sqlite"][k], 2) for k in keys
                                if result["sqlite"][k] > 0}
    result.update(chromium=chromium, machine=machine(), git=git_state(), load_avg_1m_at_end=round(os.getloadavg()[0], 1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
