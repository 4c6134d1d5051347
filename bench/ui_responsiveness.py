"""Web UI responsiveness with a 10,000,000-point series and 1,000 runs, measured in a real browser.

Builds a throwaway store: 1,000 ordinary runs (train/loss, train/tokens_per_s, 2 ranks x 500
steps) plus one run whose train/loss has 10M points on one rank. Serves it with the UI server in
this process and drives Debian's chromium with Playwright:

  runs_table_ms   page load until the runs table is drawn (all 1,001 runs loaded, sorted and
                  counted; the first 200 rows drawn, the rest behind "show more")
  run_chart_ms    page load of the big run until its train/loss chart has drawn
  zoom_in_ms      click "+" until the chart has redrawn from the server
  zoom_drag_ms    drag-select 8 px until redrawn; repeated until the chart is at full resolution
  api_*_ms        the same JSON requests over urllib, without the browser

Cold = first request after the server starts (runs-table stats not cached yet). Each browser
figure is the median of --repeats. Prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.store import Store  # noqa: E402
from orchestrator.ui.server import start_in_thread  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 120_000


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build(root: Path, runs: int, points: int) -> None:
    store = Store(root)
    steps = np.arange(500)
    for i in range(runs):
        rid = f"run{i:04d}"
        store.create_run(run_id=rid, name=f"sweep-{i % 37}", config={"optim": {"lr": 1e-4 * (1 + i % 10)}, "seed": i},
                         git_commit="abc123", host="node", command="orchestrator launch x.yaml", world_size=2,
                         tags={"sweep": str(i // 100)})
        for rank in (0, 1):
            loss = 2 + 3 * np.exp(-steps / (100 + i % 50)) + 0.01 * rank
            store.points.append(rid, rank, 0, {"train/loss": (steps, loss),
                                               "train/tokens_per_s": (steps, np.full(500, 1e4 + i))})
        if i % 3:
            store.finish_run(rid, "completed", summary={"last_loss": float(loss[-1])})
    store.create_run(run_id="big", name="ten-million", config={"optim": {"lr": 3e-4}}, git_commit="abc123",
                     host="node", command="orchestrator launch big.yaml", world_size=1)
    rng = np.random.default_rng(0)
    per = 1_000_000
    for lo in range(0, points, per):
        s = np.arange(lo, min(points, lo + per))
        v = 2 + 3 * np.exp(-s / 2e6) + rng.normal(0, 0.05, len(s))
        store.points.append("big", 0, 0, {"train/loss": (s, v)})
    store.close()


def timed_get(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        r.read()
    return (time.perf_counter() - t) * 1000


def chart_state(page) -> dict:
    return page.eval_on_selector('.metric-card[data-key="train/loss"] .chart', "c => Object.assign({}, c.dataset)")


def wait_draws(page, above: int) -> None:
    page.wait_for_function(
        f"""() => {{ const c = document.querySelector('.metric-card[data-key="train/loss"] .chart');
                    return c && Number(c.dataset.draws || 0) > {above}; }}""", polling="raf", timeout=WAIT_MS)


def measure_browser(url: str, runs: int, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    out: dict[str, list[float]] = {"runs_table_ms": [], "run_chart_ms": [], "zoom_in_ms": [], "zoom_drag_ms": [],
                                 "drags_to_full_res": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=WAIT_MS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.set_default_timeout(WAIT_MS)
        for i in range(repeats):
            t = time.perf_counter()
            page.goto(f"{url}?r={i}#/")
            page.wait_for_selector(f'#runs-table[data-rows="{runs + 1}"]', timeout=WAIT_MS)
            out["runs_table_ms"].append((time.perf_counter() - t) * 1000)

            t = time.perf_counter()
            page.goto(f"{url}?r={i}#/run/big")
            wait_draws(page, 0)
            out["run_chart_ms"].append((time.perf_counter() - t) * 1000)
            state = chart_state(page)
            assert int(state["points"]) > 100 and state["full"] == "false", state

            card = page.locator('.metric-card[data-key="train/loss"]')
            draws = int(chart_state(page)["draws"])
            t = time.perf_counter()
            card.locator(".zoom-in").click()
            wait_draws(page, draws)
            out["zoom_in_ms"].append((time.perf_counter() - t) * 1000)

            # drags of 8 px in the middle until the server answers at full resolution
            box = card.locator("canvas").bounding_box()
            x = box["x"] + 58 + (box["width"] - 70) * 0.5
            y = box["y"] + box["height"] / 2
            for _ in range(6):
                draws = int(chart_state(page)["draws"])
                t = time.perf_counter()
                page.mouse.move(x - 4, y)
                page.mouse.down()
                page.mouse.move(x + 4, y, steps=2)
                page.mouse.up()
                wait_draws(page, draws)
                out["zoom_drag_ms"].append((time.perf_counter() - t) * 1000)
                if chart_state(page)["full"] == "true":
                    break
            out["drags_to_full_res"].append(len(out["zoom_drag_ms"]) - sum(out["drags_to_full_res"]))
            state = chart_state(page)
            log(f"repeat {i}: {json.dumps({k: round(v[-1]) for k, v in out.items() if v})} "
                f"zoomed to {state['lo']}..{state['hi']} full={state['full']}")
        version = browser.version
        browser.close()
    return {**{k: round(statistics.median(v), 1) for k, v in out.items()},
            "all": {k: [round(x) for x in v] for k, v in out.items()}, "chromium": version}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--points", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ui-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        build(root, args.runs, args.points)
        log(f"store built in {time.perf_counter() - t:.1f}s ({(root / 'store.db').stat().st_size / 1e6:.0f} MB)")
        server, _ = start_in_thread(store=Store(root), port=0)
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        api = {
            "api_runs_cold_ms": timed_get(url + "api/runs"),
            "api_runs_warm_ms": statistics.median(timed_get(url + "api/runs") for _ in range(5)),
            "api_chart_10M_ms": statistics.median(
                timed_get(url + "api/run/big/metric?key=train/loss&buckets=1000") for _ in range(5)),
            "api_zoom_half_10M_ms": statistics.median(
                timed_get(url + f"api/run/big/metric?key=train/loss&buckets=1000&lo={i * 100_000}&hi={i * 100_000 + 5_000_000}")
                for i in range(5)),
            "api_zoom_full_res_ms": statistics.median(
                timed_get(url + f"api/run/big/metric?key=train/loss&buckets=1000&lo={i * 777_777}&hi={i * 777_777 + 999}")
                for i in range(5)),
        }
        log(json.dumps({k: round(v, 1) for k, v in api.items()}))
        browser = measure_browser(url, args.runs, args.repeats)
        server.shutdown()
        server.server_close()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    result = {"runs": args.runs + 1, "series_points": args.points, "repeats": args.repeats,
              **{k: round(v, 1) for k, v in api.items()}, **browser, "machine": f"{cpu}, {nproc} cores",
              "load_avg_1m_at_end": round(os.getloadavg()[0], 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
