"""The `orchestrator` command. Errors are one line on stderr and a non-zero exit; a bug's traceback
goes to a crash log in the store, never to the user's terminal."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
import traceback

from orchestrator.errors import UserError


def out(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> Parser:
    p = Parser(prog="orchestrator", description="Distributed PyTorch training on Ray, tracked and fault tolerant.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    launch = sub.add_parser("launch", help="start a run from a YAML config")
    launch.add_argument("config", help="path to a YAML config")
    launch.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    launch.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local cluster)")

    runs = sub.add_parser("runs", help="list runs in the tracking store")
    runs.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="one run's status, config and summary")
    show.add_argument("run")
    show.add_argument("--json", action="store_true")

    metrics = sub.add_parser("metrics", help="a metric's points (min/max kept when bucketed), or the run's keys")
    metrics.add_argument("run")
    metrics.add_argument("--key", help="metric key, e.g. train/loss; omit to list the keys")
    metrics.add_argument("--buckets", type=int, help="downsample to N buckets (default: 40 in text, all in --json)")
    metrics.add_argument("--rank", type=int, help="one rank's values instead of the mean over ranks")
    metrics.add_argument("--json", action="store_true")

    ckpts = sub.add_parser("checkpoints", help="a run's checkpoints: committed, failed, corrupt")
    ckpts.add_argument("run")
    ckpts.add_argument("--verify", action="store_true", help="re-read every file and check its sha256")
    ckpts.add_argument("--json", action="store_true")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    prep = data_sub.add_parser("prepare", help="turn text files into byte-token shards")
    prep.add_argument("sources", nargs="+", metavar="SRC", help="files or directories")
    prep.add_argument("--out", required=True, help="destination URI (a folder or s3://bucket/prefix)")
    prep.add_argument("--seq-len", type=int, default=129, help="tokens per sequence (model context + 1)")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="share of files held out for eval")
    prep.add_argument("--include", default="*.py,*.txt,*.md,*.rst", help="comma-separated file patterns")
    prep.add_argument("--shard-mb", type=float, default=16.0)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args, argv) or 0
    except KeyboardInterrupt:
        print("orchestrator: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        cause = e.__cause__
        if cause is not None and type(cause).__name__ == "_WorkerTraceback":
            print(str(cause), file=sys.stderr)  # the worker's own traceback, shown once
        print(f"orchestrator: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug of ours: keep the traceback, show one line
        log = _crash_log()
        print(f"orchestrator: internal error: {type(e).__name__}: {e} (traceback in {log})", file=sys.stderr)
        return 1


def _crash_log() -> str:
    from orchestrator.store import home

    path = home() / "logs" / f"crash-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(traceback.format_exc())
    return str(path)


# --- commands ------------------------------------------------------------------------------


def cmd_launch(args, argv) -> int:
    from orchestrator.config import load_config
    from orchestrator.driver import launch

    cfg = load_config(args.config, args.overrides)
    launch(cfg, address=args.address, command=shlex.join(["orchestrator", *argv]), out=out)
    return 0



def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _duration(run: dict) -> str:
    from orchestrator.progress import fmt_duration

    end = run["ended_at"] or time.time()
    return fmt_duration(end - run["created_at"])


def cmd_runs(args, argv) -> int:
    from orchestrator.store import Store

    runs = Store().runs()
    if args.json:
        keys = ("id", "name", "status", "parent", "fork_step", "created_at", "ended_at", "world_size", "git_commit")
        out(json.dumps([{k: r[k] for k in keys} for r in runs], indent=1))
        return 0
    if not runs:
        out("no runs yet (start one with `orchestrator launch CONFIG.yaml`)")
        return 0
    rows = [("ID", "NAME", "STATUS", "STARTED", "DURATION", "LOSS")]
    for r in runs:
        loss = (r["summary"] or {}).get("last_loss")
        rows.append((r["id"], r["name"], r["status"], _when(r["created_at"]), _duration(r), f"{loss:.4f}" if loss else "-"))
    _table(rows)
    return 0


def _table(rows: list[tuple]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def cmd_show(args, argv) -> int:
    import yaml

    from orchestrator.store import Store

    store = Store()
    run = store.run(args.run)
    keys = store.metric_keys(run["id"])
    if args.json:
        out(json.dumps({**run, "metric_keys": keys}, indent=1))
        return 0
    fields = [
        ("run", run["id"]), ("name", run["name"]), ("status", run["status"]),
        ("started", _when(run["created_at"])), ("ended", _when(run["ended_at"])), ("duration", _duration(run)),
        ("workers", run["world_size"]), ("host", run["host"]), ("git commit", run["git_commit"] or "-"),
        ("command", run["command"] or "-"),
    ]
    if run["parent"]:
        fields.append(("forked from", f"{run['parent']} at step {run['fork_step']}"))
    for name, value in fields:
        out(f"{name:>12}: {value}")
    if run["error"]:
        out(f"{'error':>12}: {run['error']}")
    for k, v in (run["summary"] or {}).items():
        out(f"{k:>12}: {v:.4g}" if isinstance(v, float) else f"{k:>12}: {v}")
    out(f"{'metrics':>12}: {', '.join(keys) or '-'}")
    out("config:")
    out("  " + yaml.safe_dump(run["config"], sort_keys=False).rstrip().replace("\n", "\n  "))
    return 0


SPARK = "▁▂▃▄▅▆▇█"


def cmd_metrics(args, argv) -> int:
    from orchestrator.store import Store

    store = Store()
    run = store.run(args.run)
    keys = store.metric_keys(run["id"])
    if args.key is None:
        out(json.dumps({"keys": keys}) if args.json else "\n".join(keys) or "(no metrics yet)")
        return 0
    if args.key not in keys:
        import difflib

        close = difflib.get_close_matches(args.key, keys, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (keys: {', '.join(keys) or 'none yet'})"
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
    values = [p["value"] for p in points]
    if values:
        lo, hi = min(p.get("min", p["value"]) for p in points), max(p.get("max", p["value"]) for p in points)
        span = (hi - lo) or 1.0
        out(f"{args.key}  {''.join(SPARK[int((v - lo) / span * 7)] for v in values)}  [{lo:.4g} .. {hi:.4g}]")
    rows = [("STEP", "VALUE", "MIN", "MAX")]
    for p in points:
        rows.append((p["step"], f"{p['value']:.6g}", f"{p.get('min', p['value']):.6g}", f"{p.get('max', p['value']):.6g}"))
    _table(rows)
    return 0


def cmd_checkpoints(args, argv) -> int:
    from checkpointing.report import checkpoint_report, report_rows

    report = checkpoint_report(args.run, check=args.verify)
    if args.json:
        out(json.dumps(report, indent=1))
        return 0
    out(f"checkpoints of {report['run']} in {report['uri']}")
    if report["location_error"]:
        out(f"(cannot read the destination: {report['location_error']})")
    if report["checkpoints"]:
        _table(report_rows(report))
    else:
        out("no checkpoints yet")
    return 0


def cmd_data(args, argv) -> int:
    from dataloading.prepare import prepare

    include = [s.strip() for s in args.include.split(",") if s.strip()]
    prepare(args.sources, args.out, seq_len=args.seq_len, val_fraction=args.val_fraction, include=include,
            shard_mb=args.shard_mb, log=out)
    return 0


COMMANDS = {"launch": cmd_launch, "runs": cmd_runs, "show": cmd_show, "metrics": cmd_metrics, "data": cmd_data,
            "checkpoints": cmd_checkpoints}

if __name__ == "__main__":
    sys.exit(main())
