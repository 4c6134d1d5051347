"""Following a run from any terminal: `logs` (the ranks' output lines, by attempt and rank;
--follow until the run ends), `attach` (progress and alerts until it ends) and `stop`."""

from __future__ import annotations

import json
import time

from common.errors import UserError
from orchestrator.run_views import out
from orchestrator.store import open_store

FOLLOW_EVERY_S = 1.0
STOP_WAIT_S = 300.0  # how long `stop` waits for the driver to end the run (more if the run gives its ranks longer)


def cmd_logs(args, argv) -> int:
    store = open_store(create=False)
    run = store.run(args.run)
    rows = store.logs.read(run["id"], rank=args.rank, attempt=args.attempt)
    if args.json:
        out(json.dumps({"run": run["id"], "lines": rows}, indent=1))
        return 0
    if not rows and not args.follow:
        out(f"no output lines stored for {run['id']} (lines are kept for script entrypoints)")
        return 0
    last = _show(rows)
    while args.follow:
        if store.run(run["id"])["status"] != "running":
            _show(store.logs.read(run["id"], rank=args.rank, attempt=args.attempt, after=last))
            return 0
        time.sleep(FOLLOW_EVERY_S)
        last = _show(store.logs.read(run["id"], rank=args.rank, attempt=args.attempt, after=last)) or last
    return 0


def _show(rows: list[dict]) -> int:
    for r in rows:
        err = " stderr" if r["stream"] == "stderr" else ""
        out(f"[a{r['attempt']} r{r['rank']}{err}] {r['line']}")
    return rows[-1]["id"] if rows else 0


def cmd_attach(args, argv) -> int:
    """Progress (rank 0's train/loss), events and the end, from the store: works for detached runs."""
    store = open_store(create=False)
    run = store.run(args.run)
    out(f"run {run['id']} ({run['name']}): {run['status']}")
    seen_events, shown_step = len(store.events(run["id"])), None
    while True:
        run = store.run(run["id"])
        events = store.events(run["id"])
        for e in events[seen_events:]:
            out(f"{e['severity'].upper()} {e['kind']}: {e['message']}")
        seen_events = len(events)
        if "train/loss" in store.metric_keys(run["id"]):
            points = store.series(run["id"], "train/loss", rank=0)
            if points and points[-1]["step"] != shown_step:
                shown_step = points[-1]["step"]
                out(f"step {shown_step + 1} | loss {points[-1]['value']:.4f}")
        if run["status"] != "running":
            out(f"run {run['id']} {run['status']}" + (f": {run['error']}" if run.get("error") else ""))
            return 0 if run["status"] in ("completed", "stopped") else 1
        time.sleep(FOLLOW_EVERY_S * 2)


def cmd_stop(args, argv) -> int:
    store = open_store(create=False)
    run = store.run(args.run)
    if run["status"] != "running":
        hint = f"; `orchestrator resume {run['id']}` continues it" if run["status"] == "lost" else ""
        raise UserError(f"run {run['id']} is {run['status']}, not running: nothing to stop{hint}")
    store.request_stop(run["id"])
    out(f"stop requested for run {run['id']}; at its next beat its driver has the ranks save a final checkpoint "
        "and end")
    if args.no_wait:
        return 0
    ranks_get = ((run.get("config") or {}).get("fault_tolerance") or {}).get("stop_timeout_s")
    wait_s = max(STOP_WAIT_S, float(ranks_get) + 60) if isinstance(ranks_get, (int, float)) else STOP_WAIT_S
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status = store.run(run["id"])["status"]
        if status != "running":
            out(f"run {run['id']} {status}")
            return 0
        time.sleep(FOLLOW_EVERY_S)
    raise UserError(f"run {run['id']} is still running {wait_s:.0f}s after the stop request; is its driver "
                    "alive? (`orchestrator runs` shows lost drivers)")
