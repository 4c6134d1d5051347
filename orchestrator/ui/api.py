"""The JSON API behind the UI. Every answer is plain data; the front end renders it as text.

GET /api/runs                                   runs table rows (with last/best loss, tokens/s, restarts)
GET /api/run/RUN                                run, metric keys, events, notes, attempts, lineage tree
GET /api/run/RUN/metric?key=K&buckets=N[&rank=R][&lo=A&hi=B]
                                                buckets (mean, min, max, first, last, count) of steps A..B
GET /api/run/RUN/checkpoints                    checkpoint report (or why it is unavailable)
GET /api/compare?runs=A,B[,C...]                config diff and key metrics of 2..20 runs

Each request reads through its own read-only connection (readstore.py), so no request waits for
another. Bad parameters raise params.BadRequest (400); unknown runs and paths raise NotFound (404).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import closing
from urllib.parse import unquote

from common.errors import UserError
from orchestrator.config import flatten
from orchestrator.run_views import COMPARE_KEYS
from orchestrator.ui.params import BadRequest, metric_args, run_refs
from orchestrator.ui.ranges import RangeReader, is_long, metric, quick_stats
from orchestrator.ui.readstore import ReadStore

TABLE_KEYS = ("train/loss", "train/tokens_per_s")
log = logging.getLogger(__name__)


class NotFound(Exception):
    pass


class Api:
    def __init__(self, store):
        self.path = store.path  # the server's Store; requests open their own read-only views of it
        self.uri = getattr(store, "uri", store.path)  # what to open them with (a PostgreSQL URI keeps its password)
        self.reader = RangeReader()
        self._stats: dict[tuple[str, str], tuple[tuple, dict]] = {}
        # fill the runs-table cache (~1 ms a run) before the first page asks for it
        threading.Thread(target=self._warm_up, name="ui-warm-up", daemon=True).start()

    def open(self) -> ReadStore:
        return ReadStore(self.uri)

    def _warm_up(self) -> None:
        try:
            self.get("runs", {})
        except Exception as e:  # the first real request will say what is wrong
            log.debug("ui warm-up failed: %s", e)

    def get(self, path: str, query: dict) -> dict | list:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[0] == "run" and parts[2:] == ["metric"]:
            args = metric_args(query)  # checked before anything is read
        with closing(self.open()) as store:
            if parts == ["runs"]:
                return self.runs(store)
            if parts == ["compare"]:
                return self.compare(store, run_refs(query))
            if len(parts) == 2 and parts[0] == "run":
                return self.run(store, self._run(store, parts[1]))
            if len(parts) == 3 and parts[0] == "run" and parts[2] == "metric":
                return self.metric(store, self._run(store, parts[1]), args)
            if len(parts) == 3 and parts[0] == "run" and parts[2] == "checkpoints":
                return self.checkpoints(store, self._run(store, parts[1]))
        raise NotFound(f"no API endpoint /api/{path[:200]}")

    @staticmethod
    def _run(store, ref: str) -> dict:
        try:
            return store.run(ref)
        except UserError as e:
            raise NotFound(str(e)) from None

    # --- runs table -----------------------------------------------------------------------

    def runs(self, store) -> dict:
        marks = ",".join("?" * len(TABLE_KEYS))
        found: dict[tuple[str, str], list] = {}
        for rid, key, sid, rank, attempt, n in store.db.execute(
            f"SELECT run_id, key, id, rank, attempt, n FROM series WHERE key IN ({marks}) ORDER BY rank, attempt",
            TABLE_KEYS,
        ):
            found.setdefault((rid, key), []).append((sid, rank, attempt, n))
        attempts = dict(store.db.execute("SELECT run_id, COUNT(*) FROM attempts GROUP BY run_id").fetchall())
        stale = [sid for k, f in found.items() if self._cached(k, f) is None and not is_long(f) for sid, *_ in f]
        read = store.points.read_many(stale)  # not one query per series: each is a round trip on PostgreSQL
        rows = []
        for r in store.runs():
            stats = {key: self._quick(store, r["id"], key, found.get((r["id"], key), []), read) for key in TABLE_KEYS}
            summary = r["summary"] or {}
            restarts = summary.get("restarts")
            if restarts is None and attempts.get(r["id"]):
                restarts = attempts[r["id"]] - 1
            rows.append({
                "id": r["id"], "name": r["name"], "status": r["status"], "tags": r["tags"],
                "parent": r["parent"], "fork_step": r["fork_step"], "created_at": r["created_at"],
                "ended_at": r["ended_at"], "world_size": r["world_size"], "git_commit": r["git_commit"],
                "last_loss": stats["train/loss"].get("last", summary.get("last_loss")),
                "best_loss": stats["train/loss"].get("best"),
                "last_step": stats["train/loss"].get("last_step"),
                "tokens_per_s": stats["train/tokens_per_s"].get("mean"),
                "restarts": restarts,
            })
        return {"now": time.time(), "runs": rows}

    def _cached(self, run_key: tuple[str, str], found: list) -> dict | None:
        hit = self._stats.get(run_key)
        return hit[1] if hit is not None and hit[0] == tuple(found) else None  # the signature changes as a series grows

    def _quick(self, store, run_id: str, key: str, found: list, read: dict) -> dict:
        stats = self._cached((run_id, key), found)
        if stats is None:
            stats = quick_stats(store, run_id, key, found, read)
            self._stats[(run_id, key)] = (tuple(found), stats)
        return stats

    # --- one run --------------------------------------------------------------------------

    @staticmethod
    def run(store, run: dict) -> dict:
        rid = run["id"]
        return {
            **run,
            "now": time.time(),
            "metric_keys": store.metric_keys(rid),
            "events": store.events(rid),
            "notes": store.notes(rid),
            "attempts": store.attempts(rid),
            "lineage": lineage(store, rid),
        }

    def metric(self, store, run: dict, args: dict) -> dict:
        return metric(store, self.reader, run["id"], args["key"], buckets=args["buckets"], rank=args["rank"],
                      lo=args["lo"], hi=args["hi"])

    @staticmethod
    def checkpoints(store, run: dict) -> dict:
        try:
            from orchestrator.checkpoint_views import checkpoint_report  # imports torch: only when asked

            return {"available": True, **checkpoint_report(run["id"], store=store)}
        except Exception as e:  # a checkpoint problem must not take the run page down
            return {"available": False, "error": f"{type(e).__name__}: {e}"}

    # --- compare --------------------------------------------------------------------------

    @staticmethod
    def compare(store, refs: list[str]) -> dict:
        # refs are distinct strings already; a run named by id and by name still counts once
        runs = list({r["id"]: r for r in (Api._run(store, ref) for ref in refs)}.values())
        if len(runs) < 2:
            raise BadRequest(f"compare needs at least two different runs; {', '.join(refs)[:200]} name one")
        flats = [flatten(r["config"]) for r in runs]
        keys = sorted(set().union(*flats))
        config = [{"key": k, "values": [f.get(k) for f in flats],
                   "differs": len({repr(f.get(k)) for f in flats}) > 1} for k in keys]
        metric_keys = [store.metric_keys(r["id"]) for r in runs]
        common = sorted(set(metric_keys[0]).intersection(*metric_keys[1:]))
        metrics = {}
        for key in COMPARE_KEYS:
            metrics[key] = {r["id"]: quick_stats(store, r["id"], key, store.points.find(r["id"], key))
                            for r in runs}
        return {"runs": [{"id": r["id"], "name": r["name"], "status": r["status"], "parent": r["parent"],
                          "fork_step": r["fork_step"]} for r in runs],
                "config": config, "metric_keys": common, "metrics": metrics}


def lineage(store, run_id: str) -> dict:
    """The whole fork tree this run belongs to, from its oldest ancestor down."""
    rows = store.db.execute("SELECT id, name, status, parent, fork_step, created_at FROM runs").fetchall()
    by_id = {r[0]: r for r in rows}
    children: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r[5]):
        if r[3] is not None:
            children.setdefault(r[3], []).append(r[0])
    root = store.lineage(run_id)[0][0]

    def node(rid: str, depth: int = 0) -> dict:
        r = by_id.get(rid)
        kids = children.get(rid, []) if depth < 50 else []
        return {"id": rid, "name": r[1] if r else "?", "status": r[2] if r else "missing",
                "fork_step": r[4] if r else None, "current": rid == run_id,
                "children": [node(k, depth + 1) for k in kids]}

    return node(root)
