"""The `orchestrator` command. Errors are one line on stderr and a non-zero exit; a bug's traceback
goes to a crash log in the store, never to the user's terminal."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback

from orchestrator import run_views
from orchestrator.errors import UserError
from orchestrator.run_views import out, table


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

    resume = sub.add_parser("resume", help="continue a run from its latest good checkpoint (same run id)")
    resume.add_argument("run")
    resume.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. train.max_steps=2000")
    resume.add_argument("--address", help="Ray cluster address")

    fork = sub.add_parser("fork", help="a new run from a run's checkpoint at step N, inheriting its history")
    fork.add_argument("run")
    fork.add_argument("--step", type=int, required=True, help="a step with a committed checkpoint")
    fork.add_argument("overrides", nargs="*", metavar="key.path=value")
    fork.add_argument("--name", help="name of the new run")
    fork.add_argument("--address", help="Ray cluster address")

    runs = sub.add_parser("runs", help="list runs in the tracking store")
    runs.add_argument("--status", choices=["running", "completed", "failed", "interrupted"])
    runs.add_argument("--tag", action="append", default=[], metavar="key[=value]", help="only runs with this tag")
    runs.add_argument("--where", action="append", default=[], metavar="config.path=value",
                      help="only runs whose resolved config has this value, e.g. optim.lr=0.001")
    runs.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="one run's status, config and summary")
    show.add_argument("run")
    show.add_argument("--json", action="store_true")

    compare = sub.add_parser("compare", help="runs side by side: config differences, final and best metrics")
    compare.add_argument("runs", nargs="+", metavar="RUN")
    compare.add_argument("--key", action="append", help="metric to compare (repeatable; default: loss, eval loss, tokens/s)")
    compare.add_argument("--json", action="store_true")

    diagnose = sub.add_parser("diagnose", help="stalls and stragglers: culprit rank, node, phase, evidence, action")
    diagnose.add_argument("run")
    diagnose.add_argument("--json", action="store_true")

    tag = sub.add_parser("tag", help="set tags on a run")
    tag.add_argument("run")
    tag.add_argument("tags", nargs="+", metavar="key=value")

    note = sub.add_parser("note", help="add a note to a run")
    note.add_argument("run")
    note.add_argument("text")

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

    ui = sub.add_parser("ui", help="serve the web UI for the tracking store")
    ui.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; others need --token)")
    ui.add_argument("--port", type=int, default=8080, help="port (0 = a free one)")
    ui.add_argument("--token", help="access token, required when --host is not loopback")

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


def parse(argv: list[str]) -> argparse.Namespace:
    """Like parse_args, but key.path=value overrides may also follow options (`fork R --step 8 a.b=1`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        return COMMANDS[args.command](args, argv) or 0
    except KeyboardInterrupt:
        print("orchestrator: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        cause = e.__cause__
        if cause is not None and type(cause).__name__ == "WorkerTraceback":
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
        table(report_rows(report))
    else:
        out("no checkpoints yet")
    return 0


def cmd_resume(args, argv) -> int:
    from orchestrator.driver import resume

    resume(args.run, args.overrides, address=args.address, out=out)
    return 0


def cmd_fork(args, argv) -> int:
    from orchestrator.driver import fork

    fork(args.run, args.step, args.overrides, name=args.name, address=args.address,
         command=shlex.join(["orchestrator", *argv]), out=out)
    return 0


def cmd_ui(args, argv) -> int:
    from orchestrator.ui.server import serve

    serve(host=args.host, port=args.port, token=args.token, out=out)
    return 0


def cmd_data(args, argv) -> int:
    from dataloading.prepare import prepare

    include = [s.strip() for s in args.include.split(",") if s.strip()]
    prepare(args.sources, args.out, seq_len=args.seq_len, val_fraction=args.val_fraction, include=include,
            shard_mb=args.shard_mb, log=out)
    return 0


COMMANDS = {
    "launch": cmd_launch, "resume": cmd_resume, "fork": cmd_fork, "data": cmd_data,
    "checkpoints": cmd_checkpoints, "ui": cmd_ui,
    "runs": run_views.cmd_runs, "show": run_views.cmd_show, "metrics": run_views.cmd_metrics,
    "compare": run_views.cmd_compare, "tag": run_views.cmd_tag, "note": run_views.cmd_note,
    "diagnose": run_views.cmd_diagnose,
}

if __name__ == "__main__":
    sys.exit(main())
