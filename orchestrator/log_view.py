"""`orchestrator logs RUN`: the ranks' output lines as stored, by attempt and rank; --follow
keeps printing until the run ends."""

from __future__ import annotations

import json
import time

from orchestrator.run_views import out
from orchestrator.store import Store

FOLLOW_EVERY_S = 1.0


def cmd_logs(args, argv) -> int:
    store = Store(create=False)
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
