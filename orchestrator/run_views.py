"""CLI commands that read and annotate runs: runs, show, metrics, compare, tag, note."""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import time

import yaml

from common.errors import UserError
from orchestrator.config import flatten
from orchestrator.progress import fmt_duration
from orchestrator.store import Store, locate, open_store

SPARK = "▁▂▃▄▅▆▇█"
COMPARE_KEYS = ("train/loss", "eval/loss", "train/tokens_per_s")


def out(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


def table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def duration(run: dict) -> str:
    return fmt_duration((run["ended_at"] or time.time()) - run["created_at"])


def _matches(run: dict, tags: list[str], wheres: list[str]) -> bool:
    for t in tags:
        key, eq, value = t.partition("=")
        if key not in run["tags"] or (eq and run["tags"][key] != value):
            return False
    flat = flatten(run["config"])
    for w in wheres:
        key, eq, text = w.partition("=")
        if not eq:
            raise UserError(f"--where {w!r}: expected config.path=value")
        if key not in flat:
            close = difflib.get_close_matches(key, list(flat), n=1)
            raise UserError(f"--where {w!r}: no config key {key}" + (f"; did you mean {close[0]}?" if close else ""))
        wanted = yaml.safe_load(text)
        if isinstance(flat[key], float) and isinstance(wanted, str):
            try:
                wanted = float(wanted)  # PyYAML reads 1e-3 as a string
            except ValueError:
                pass
        if flat[key] != wanted:
            return False
    return True


def cmd_runs(args, argv) -> int:
    where = locate()  # no SQLite store yet: no runs, and none is made by looking
    missing = where.kind == "sqlite" and not where.path.exists() and not where.path.parent.is_file()
    runs = [r for r in ([] if missing else open_store(create=False).runs())
            if (args.status is None or r["status"] == args.status) and _matches(r, args.tag, args.where)]
    if args.json:
        keys = ("id", "name", "status", "parent", "fork_step", "created_at", "ended_at", "world_size", "git_commit", "tags")
        out(json.dumps([{k: r[k] for k in keys} for r in runs], indent=1))
        return 0
    if not runs:
        out("no runs match" if (args.status or args.tag or args.where) else
            "no runs yet (start one with `orchestrator launch CONFIG.yaml`)")
        return 0
    rows = [("ID", "NAME", "STATUS", "STARTED", "DURATION", "LOSS", "TAGS")]
    for r in runs:
        loss = (r["summary"] or {}).get("last_loss")
        tags = ",".join(f"{k}={v}" if v else k for k, v in r["tags"].items())
        rows.append((r["id"], r["name"], r["status"], when(r["created_at"]), duration(r),
                     f"{loss:.4f}" if loss is not None else "-", tags or "-"))
    table(rows)
    return 0


def cmd_show(args, argv) -> int:
    store = open_store()
    run = store.run(args.run)
    keys = store.metric_keys(run["id"])
    events = store.events(run["id"])
    notes = store.notes(run["id"])
    if args.json:
        out(json.dumps({**run, "metric_keys": keys, "events": events, "notes": notes,
                        "attempts": store.attempts(run["id"])}, indent=1))
        return 0
    meta = run["meta"]
    git = meta.get("git", {})
    fields = [
        ("run", run["id"]), ("name", run["name"]), ("status", run["status"]),
        ("started", when(run["created_at"])), ("ended", when(run["ended_at"])), ("duration", duration(run)),
        ("workers", run["world_size"]), ("host", run["host"]),
        ("git commit", (run["git_commit"] or "-") + (" (uncommitted changes)" if git.get("dirty") else "")),
        ("command", run["command"] or "-"),
    ]
    if run["parent"]:
        fields.append(("forked from", f"{run['parent']} at step {run['fork_step']}"))
    if run["tags"]:
        fields.append(("tags", ", ".join(f"{k}={v}" if v else k for k, v in run["tags"].items())))
    if meta.get("versions"):
        v = meta["versions"]
        fields.append(("versions", ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "ray") if k in v)))
    if meta.get("workers"):
        hosts = sorted({w.get("hostname", "?") for w in meta["workers"]})
        fields.append(("worker hosts", ", ".join(hosts)))
    if meta.get("dataset", {}).get("index_sha256"):
        fields.append(("dataset", f"{meta['dataset']['uri']} (index sha256 {meta['dataset']['index_sha256'][:12]})"))
    for name, value in fields:
        out(f"{name:>12}: {value}")
    if run["error"]:
        out(f"{'error':>12}: {run['error']}")
    for k, v in (run["summary"] or {}).items():
        out(f"{k:>12}: {v:.4g}" if isinstance(v, float) else f"{k:>12}: {v}")
    out(f"{'metrics':>12}: {', '.join(keys) or '-'}")
    for n in notes:
        out(f"{'note':>12}: {when(n['time'])} {n['text']}")
    if events:
        out(f"events ({len(events)}{', last 10' if len(events) > 10 else ''}):")
        for e in events[-10:]:
            out(f"  step {e['step'] if e['step'] is not None else '-':>6}  {e['severity']:<7} {e['kind']}: {e['message']}")
    out("config:")
    out("  " + yaml.safe_dump(run["config"], sort_keys=False).rstrip().replace("\n", "\n  "))
    return 0


def cmd_metrics(args, argv) -> int:
    store = open_store()
    run = store.run(args.run)
    keys = store.metric_keys(run["id"])
    if args.key is None:
        out(json.dumps({"keys": keys}) if args.json else "\n".join(keys) or "(no metrics yet)")
        return 0
    if args.key not in keys:
        close = difflib.get_close_matches(args.key, keys, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (keys: {', '.join(keys[:20]) or 'none yet'})"
        raise UserError(f"run {run['id']} has no metric {args.key!r}{hint}")
    if args.rank is not None and args.rank not in store.ranks(run["id"], args.key):
        raise UserError(f"metric {args.key} has no rank {args.rank} (ranks: {store.ranks(run['id'], args.key)})")
    if args.buckets is not None and args.buckets < 1:
        raise UserError(f"--buckets must be at least 1, got {args.buckets}")
    buckets = args.buckets if args.buckets is not None else (0 if args.json else 40)
    if buckets:
        points = store.buckets(run["id"], args.key, buckets, rank=args.rank)
    else:
        points = store.series(run["id"], args.key, rank=args.rank)
    if args.json:
        out(json.dumps({"run": run["id"], "key": args.key, "rank": args.rank, "points": points}))
        return 0
    def ok(v) -> bool:
        return v is not None and math.isfinite(v)

    finite = [p for p in points if ok(p["value"])]
    if finite:
        lo = min(p.get("min", p["value"]) for p in finite)
        hi = max(p.get("max", p["value"]) for p in finite)
        lo, hi = (lo, hi) if ok(lo) and ok(hi) else (min(p["value"] for p in finite), max(p["value"] for p in finite))
        span = (hi - lo) or 1.0
        spark = "".join(SPARK[min(7, max(0, int((p["value"] - lo) / span * 7)))] if ok(p["value"]) else "!"
                        for p in points)
        out(f"{args.key}  {spark}  [{lo:.4g} .. {hi:.4g}]")
    rows = [("STEP", "VALUE", "MIN", "MAX")]
    for p in points:
        rows.append((p["step"], _g(p["value"]), _g(p.get("min", p["value"])), _g(p.get("max", p["value"]))))
    table(rows)
    return 0


def compare(store: Store, refs: list[str], keys: list[str]) -> dict:
    runs = [store.run(r) for r in refs]
    flats = [flatten(r["config"]) for r in runs]
    all_keys = sorted(set().union(*flats))
    diff = {k: [f.get(k) for f in flats] for k in all_keys if len({json.dumps(f.get(k)) for f in flats}) > 1}
    metrics: dict = {}
    have = {r["id"]: set(store.metric_keys(r["id"])) for r in runs}
    for key in keys:
        metrics[key] = {}
        for r in runs:
            pts = store.series(r["id"], key) if key in have[r["id"]] else []
            vals = [p["value"] for p in pts if math.isfinite(p["value"])]
            best = (max(vals) if "tokens" in key or "acc" in key else min(vals)) if vals else None
            metrics[key][r["id"]] = {"last": pts[-1]["value"] if pts else None, "best": best,
                                     "last_step": pts[-1]["step"] if pts else None}
    return {"runs": [{"id": r["id"], "name": r["name"], "status": r["status"]} for r in runs],
            "config_diff": diff, "metrics": metrics}


def cmd_compare(args, argv) -> int:
    if len(args.runs) < 2:
        raise UserError(f"compare needs at least two runs, got {len(args.runs)}")
    result = compare(open_store(), args.runs, args.key or list(COMPARE_KEYS))
    if args.json:
        out(json.dumps(result, indent=1))
        return 0
    ids = [r["id"] for r in result["runs"]]
    rows = [("", *ids), ("status", *[r["status"] for r in result["runs"]])]
    for key, per_run in result["metrics"].items():
        for what in ("last", "best"):
            rows.append((f"{key} {what}", *[_num(per_run[i][what]) for i in ids]))
    table(rows)
    if result["config_diff"]:
        out("\nconfig differences:")
        table([("", *ids)] + [(k, *[json.dumps(v) for v in vals]) for k, vals in result["config_diff"].items()])
    else:
        out("\nsame config")
    return 0


def _g(v) -> str:
    return "-" if v is None else f"{v:.6g}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.5g}"


def cmd_tag(args, argv) -> int:
    store = open_store()
    run = store.run(args.run)
    for item in args.tags:
        key, _, value = item.partition("=")
        if not key:
            raise UserError(f"tag {item!r}: expected key=value (or a bare key)")
        store.tag(run["id"], key, value)
    out(f"{run['id']}: " + ", ".join(f"{k}={v}" if v else k for k, v in store.tags(run["id"]).items()))
    return 0


def cmd_note(args, argv) -> int:
    store = open_store()
    run = store.run(args.run)
    if not args.text.strip():
        raise UserError("note: the text is empty")
    store.add_note(run["id"], args.text)
    out(f"{run['id']}: note added ({len(store.notes(run['id']))} in all)")
    return 0
