"""The JSON API behind the UI. Every answer is plain data; the front end renders it as text.

GET /api/runs                                   runs table rows (with last/best loss, tokens/s, restarts)
GET /api/run/RUN                                run, metric keys, events, notes, attempts, lineage tree
GET /api/run/RUN/metric?key=K&buckets=N[&rank=R][&lo=A&hi=B]
                                                buckets (mean, min, max, first, last, count) of steps A..B
GET /api/run/RUN/checkpoints                    checkpoint report (or why it is unavailable)
GET /api/compare?runs=A,B[,C...]                config diff and key metrics of several runs
"""

from __future__ import annotations

import threading
import time
from urllib.parse import unquote

from orchestrator.config import flatten
from orchestrator.errors import UserError
from orchestrator.run_views import COMPARE_KEYS
from orchestrator.store import Store
from orchestrator.ui.ranges import RangeReader, metric, quick_stats

TABLE_KEYS = ("train/loss", "train/tokens_per_s")
MAX_BUCKETS = 4000


class NotFound(Exception):
    pass


class Api:
    def __init__(self, store):
        self.store = store
        self.reader = RangeReader(store.points)
        # one SQLite connection serves every request thread; reads are quick, so they take turns
        self.lock = threading.RLock()
        self._stats: dict[tuple[str, str], tuple[tuple, dict]] = {}
        # fill the runs-table cache (~1 ms a run) before the first page asks for it
        threading.Thread(target=self.get, args=("runs", {}), name="ui-warm-up", daemon=True).start()

    def get(self, path: str, query: dict) -> dict | list:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if len(parts) == 3 and parts[0] == "run" and parts[2] == "checkpoints":
            return self.checkpoints(parts[1])  # slow (imports torch, lists storage): not under the lock
        with self.lock:
            if parts == ["runs"]:
                return self.runs()
            if parts == ["compare"]:
                return self.compare([r for r in query.get("runs", "").split(",") if r])
            if len(parts) >= 2 and parts[0] == "run":
                run = self._run(parts[1])
                if len(parts) == 2:
                    return self.run(run)
                if parts[2:] == ["metric"]:
                    return self.metric(run, query)
        raise NotFound(f"no API endpoint /api/{path}")

    def _run(self, ref: str) -> dict:
        try:
            return self.store.run(ref)
        except UserError as e:
            raise NotFound(str(e)) from None

    # --- runs table -----------------------------------------------------------------------

    def runs(self) -> dict:
        db = self.store.db
        marks = ",".join("?" * len(TABLE_KEYS))
        found: dict[tuple[str, str], list] = {}
        for rid, key, sid, rank, attempt, n in db.execute(
            f"SELECT run_id, key, id, rank, attempt, n FROM series WHERE key IN ({marks}) ORDER BY rank, attempt",
            TABLE_KEYS,
        ):
            found.setdefault((rid, key), []).append((sid, rank, attempt, n))
        attempts = dict(db.execute("SELECT run_id, COUNT(*) FROM attempts GROUP BY run_id").fetchall())
        rows = []
        for r in self.store.runs():
            stats = {key: self._quick(r["id"], key, found.get((r["id"], key), [])) for key in TABLE_KEYS}
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

    def _quick(self, run_id: str, key: str, found: list) -> dict:
        sig = tuple(found)  # changes whenever a series of the run grows
        hit = self._stats.get((run_id, key))
        if hit is None or hit[0] != sig:
            hit = self._stats[(run_id, key)] = (sig, quick_stats(self.store, run_id, key, found))
        return hit[1]

    # --- one run --------------------------------------------------------------------------

    def run(self, run: dict) -> dict:
        rid = run["id"]
        return {
            **run,
            "now": time.time(),
            "metric_keys": self.store.metric_keys(rid),
            "events": self.store.events(rid),
            "notes": self.store.notes(rid),
            "attempts": self.store.attempts(rid),
            "lineage": self.lineage(rid),
        }

    def lineage(self, run_id: str) -> dict:
        """The whole fork tree this run belongs to, from its oldest ancestor down."""
        rows = self.store.db.execute("SELECT id, name, status, parent, fork_step, created_at FROM runs").fetchall()
        by_id = {r[0]: r for r in rows}
        children: dict[str, list[str]] = {}
        for r in sorted(rows, key=lambda r: r[5]):
            if r[3] is not None:
                children.setdefault(r[3], []).append(r[0])
        root = self.store.lineage(run_id)[0][0]

        def node(rid: str, depth: int = 0) -> dict:
            r = by_id.get(rid)
            kids = children.get(rid, []) if depth < 50 else []
            return {"id": rid, "name": r[1] if r else "?", "status": r[2] if r else "missing",
                    "fork_step": r[4] if r else None, "current": rid == run_id,
                    "children": [node(k, depth + 1) for k in kids]}

        return node(root)

    def metric(self, run: dict, query: dict) -> dict:
        key = query.get("key")
        if not key:
            raise UserError("metric: the key parameter is missing")
        buckets = _int(query, "buckets", 1000)
        if not 1 <= buckets <= MAX_BUCKETS:
            raise UserError(f"buckets must be 1..{MAX_BUCKETS}, got {buckets}")
        return metric(self.store, self.reader, run["id"], key, buckets=buckets, rank=_int(query, "rank"),
                      lo=_int(query, "lo"), hi=_int(query, "hi"))

    def checkpoints(self, ref: str) -> dict:
        with self.lock:
            run = self._run(ref)
        store = Store(self.store.root)  # its own connection, so other requests need not wait
        try:
            from checkpointing.report import checkpoint_report

            return {"available": True, **checkpoint_report(run["id"], store=store)}
        except Exception as e:  # a checkpoint problem must not take the run page down
            return {"available": False, "error": f"{type(e).__name__}: {e}"}
        finally:
            store.close()

    # --- compare --------------------------------------------------------------------------

    def compare(self, refs: list[str]) -> dict:
        if len(refs) < 2:
            raise UserError(f"compare needs at least two runs, got {len(refs)}")
        runs = [self._run(r) for r in refs]
        flats = [flatten(r["config"]) for r in runs]
        keys = sorted(set().union(*flats))
        config = [{"key": k, "values": [f.get(k) for f in flats],
                   "differs": len({repr(f.get(k)) for f in flats}) > 1} for k in keys]
        metric_keys = [self.store.metric_keys(r["id"]) for r in runs]
        common = sorted(set(metric_keys[0]).intersection(*metric_keys[1:]))
        metrics = {}
        for key in COMPARE_KEYS:
            metrics[key] = {r["id"]: quick_stats(self.store, r["id"], key, self.store.points.find(r["id"], key))
                            for r in runs}
        return {"runs": [{"id": r["id"], "name": r["name"], "status": r["status"], "parent": r["parent"],
                          "fork_step": r["fork_step"]} for r in runs],
                "config": config, "metric_keys": common, "metrics": metrics}


def _int(query: dict, name: str, default: int | None = None) -> int | None:
    v = query.get(name)
    if v in (None, ""):
        return default
    try:
        return int(float(v))
    except ValueError:
        raise UserError(f"{name} must be an integer, got {v!r}") from None
