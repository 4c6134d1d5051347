"""The `orchestrator` command. Errors are one line on stderr and a non-zero exit; a bug's traceback
goes to a crash log in the store, never to the user's terminal.

What commands print from the store is made safe for a terminal and for parsers here: control
characters are escaped in text output, and `--json` output is strict JSON (NaN and infinities
become null). Output cut short by its reader (`| head`) ends quietly with exit 141, as SIGPIPE
ends other tools.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common.errors import UserError
from orchestrator import cluster, log_view, run_views, store_cli, transfer_cli
from orchestrator.config import parse_yaml, redact_override, scrub_text
from orchestrator.hang import view as diagnose_view
from orchestrator.run_views import out, table
from orchestrator.store import open_store


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> Parser:
    p = Parser(prog="orchestrator", description="Distributed PyTorch training on Ray, tracked and fault tolerant.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    launch = sub.add_parser("launch", help="start a run from a YAML config (or a script: --script PATH [-- ARGS])")
    launch.add_argument("config", nargs="?", help="path to a YAML config")
    launch.add_argument("--script", help="run this torchrun-style script per rank (no config file needed; "
                                         "arguments for it after --)")
    launch.add_argument("--workers", type=int, help="ranks for --script (scaling.num_workers)")
    launch.add_argument("--detach", action="store_true",
                        help="submit the run as a Ray Job on --address and return (follow with attach/logs, end with stop)")
    launch.add_argument("--run-id", help=argparse.SUPPRESS)  # a detached job's own launch: the id chosen at submission
    launch.add_argument("--resume-if-exists", action="store_true",
                        help="continue the unfinished run of the same name instead of starting over (run.resume=auto)")
    launch.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    launch.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local cluster)")

    check = sub.add_parser("validate", help="every check launch makes before training (config, data, model, "
                                            "checkpoint destination, ports, cluster), without training")
    check.add_argument("config", help="path to a YAML config")
    check.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    check.add_argument("--address", help="Ray cluster whose resources to check (default: $RAY_ADDRESS, else skipped)")

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
    runs.add_argument("--status", choices=["running", "completed", "failed", "interrupted", "lost"])
    runs.add_argument("--tag", action="append", default=[], metavar="key[=value]", help="only runs with this tag")
    runs.add_argument("--where", action="append", default=[], metavar="config.path=value",
                      help="only runs whose resolved config has this value, e.g. optim.lr=0.001")
    runs.add_argument("--json", action="store_true")

    attach = sub.add_parser("attach", help="follow a running run's progress and alerts until it ends")
    attach.add_argument("run")
    stop = sub.add_parser("stop", help="stop a running run (its driver stops the workers; status stopped)")
    stop.add_argument("run")
    stop.add_argument("--no-wait", action="store_true", help="return once the request is recorded")

    logs = sub.add_parser("logs", help="a run's output lines (scripts' stdout and stderr), by rank and attempt")
    logs.add_argument("run")
    logs.add_argument("--rank", type=int, help="only this rank")
    logs.add_argument("--attempt", type=int, help="only this attempt (0 = the first)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the run ends")
    logs.add_argument("--json", action="store_true")

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

    for name, about in (("server", "serve the tracking store: web UI, JSON API, ingest for runs "
                                   "(tracking.uri: http://host:port) and the MLflow REST API"),
                        ("ui", "the same server as `orchestrator server`")):
        srv = sub.add_parser(name, help=about)
        srv.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; others need --token)")
        srv.add_argument("--port", type=int, default=8080, help="port (0 = a free one)")
        srv.add_argument("--token", nargs="?", const="",
                         help="require this access token (on loopback too; required off it); --token alone "
                              "makes a fresh one; default $ORCHESTRATOR_TOKEN: both keep it off the command line "
                              "where `ps` shows it")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    prep = data_sub.add_parser("prepare", help="turn text, .jsonl and .parquet files into token shards")
    prep.add_argument("sources", nargs="+", metavar="SRC", help="files or directories")
    prep.add_argument("--out", required=True, help="destination URI (a folder or s3://bucket/prefix)")
    prep.add_argument("--seq-len", type=int, default=129, help="tokens per sequence (model context + 1)")
    prep.add_argument("--val-fraction", type=float, default=0.01,
                      help="share of text files (of records, for .jsonl/.parquet) held out for eval")
    prep.add_argument("--include", default="*.py,*.txt,*.md,*.rst",
                      help="comma-separated file patterns for directories (e.g. '*.jsonl,*.parquet')")
    prep.add_argument("--shard-mb", type=float, default=16.0)
    prep.add_argument("--text-field", default="text", metavar="NAME", help="the text field (.jsonl) or column (.parquet)")
    tok = prep.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH", help="a Hugging Face tokenizer.json (default: byte tokens)")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                     help="train a byte-level BPE tokenizer of this vocabulary size on the input first")
    prep.add_argument("--eos", metavar="TOKEN", help="document separator token (default: the tokenizer's EOS)")
    store_cli.add_parser(sub, Parser)
    transfer_cli.add_parsers(sub, Parser)  # import tensorboard, export
    for name, command in sub.choices.items():  # every command that reads or writes runs can name the store
        if name not in ("data", "store") and "--store" not in command._option_string_actions:
            command.add_argument("--store", metavar="URI", help="the tracking store: a directory, a SQLite file or "
                                 "postgresql://user@host:port/db (default: $ORCHESTRATOR_STORE, else $ORCHESTRATOR_HOME)")
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """Like parse_args, but key.path=value overrides may also follow options (`fork R --step 8 a.b=1`)."""
    parser = build_parser()
    passed: list[str] = []
    if argv[:1] == ["launch"] and "--" in argv:  # what follows -- is the script's
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args, extra = parser.parse_known_args(argv)
    args.script_args = passed
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        # before anything imports Ray, which reads RAY_AUTH_MODE once
        cluster.use_token(getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"))
        _check_arguments(args)
        if getattr(args, "store", None) and args.command != "store":  # one place names the store for every call below
            os.environ["ORCHESTRATOR_STORE"] = args.store
        if args.command in ("show", "metrics", "compare", "diagnose", "checkpoints", "tag", "note", "resume",
                            "fork", "logs", "attach", "stop"):  # on existing runs: no store is an error (exit 2), never made empty
            _check_runs_exist(args)
        return _dispatch(args, argv)
    except KeyboardInterrupt:
        print("orchestrator: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_gone()
    except UserError as e:
        cause = e.__cause__
        if cause is not None and type(cause).__name__ == "WorkerTraceback":
            print(str(cause), file=sys.stderr)  # the worker's own traceback, shown once
        print(f"orchestrator: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug of ours: keep the traceback, show one line
        where = _crash_log()
        print(f"orchestrator: internal error: {type(e).__name__}: {one_line(str(e))}{where}", file=sys.stderr)
        return 1


# Commands that print what the store holds (names, tags, notes, messages: anyone's text).
STORE_VIEWS = {"runs", "show", "metrics", "compare", "diagnose", "checkpoints", "tag", "note", "validate", "logs"}


def _dispatch(args, argv) -> int:
    handler = COMMANDS[args.command]
    if args.command not in STORE_VIEWS:
        return handler(args, argv) or 0
    if getattr(args, "json", False):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = handler(args, argv) or 0
        sys.stdout.write(strict_json(buf.getvalue()))
    else:
        with contextlib.redirect_stdout(_Escaped(sys.stdout)):
            code = handler(args, argv) or 0
    sys.stdout.flush()
    return code


def _check_runs_exist(args) -> None:
    """Commands on existing runs: no store is an error (exit 2), never made empty. A PostgreSQL
    database no run has written to yet is a store without runs: "no run" here, before the command
    opens it for writing (which would give the shared database our tables)."""
    store = open_store(create=False)
    try:
        if store.empty_database:
            for ref in getattr(args, "runs", None) or [args.run]:
                store.run(ref)
    finally:
        store.close()


def _check_arguments(args) -> None:
    """Bad arguments the commands would only trip over later (as a traceback)."""
    for item in getattr(args, "where", None) or []:
        _, eq, text = item.partition("=")
        if eq:
            parse_yaml(text, f"--where {item!r}")  # ConfigError: one line, exit 2


# C0 and C1 controls (but newline and tab), DEL, and the bidirectional overrides that reorder text.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}
_ESCAPES.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]})


def escape_controls(text: str) -> str:
    """`text` with terminal control characters shown as escapes (\\x1b), so stored text cannot
    move the cursor, recolour or hide output."""
    return text.translate(_ESCAPES)


def one_line(text: str) -> str:
    """An error message as one safe line: lines joined, controls escaped, credentials removed."""
    joined = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return escape_controls(scrub_text(joined))


class _Escaped(io.TextIOBase):
    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(escape_controls(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def strict_json(text: str) -> str:
    """A command's JSON output as strict JSON: NaN and infinities (which json.dumps writes as
    NaN/Infinity, invalid JSON) become null. Text that is not one JSON document is left alone."""
    body = text.strip()
    if not body:
        return text
    try:
        value = json.loads(body, parse_constant=lambda name: None,
                           parse_float=lambda s: float(s) if math.isfinite(float(s)) else None)
    except ValueError:
        return text
    return json.dumps(value, indent=1 if "\n" in body else None, allow_nan=False) + "\n"


def _reader_gone() -> int:
    # stdout's reader closed the pipe: send what is still buffered nowhere, say nothing
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def _crash_log() -> str:
    """' (traceback in PATH)': in the store's logs, else the temp dir; never raises."""
    from orchestrator.store import home

    text = traceback.format_exc()
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (lambda: home() / "logs", lambda: Path(tempfile.gettempdir())):
        try:
            path = folder() / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold paths and values
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return f" (traceback in {path})"
        except Exception:  # noqa: BLE001, S112 (a read-only home: try the next place)
            continue
    return " (no traceback saved: no writable place)"


_OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(?:\.[\w-]+)*=")


def stored_command(argv: list[str]) -> str:
    """The command line as stored with a run: secret override values redacted, credentials in
    URLs (e.g. --address) removed."""
    words = [redact_override(a) if _OVERRIDE.match(a) else scrub_text(a) for a in argv]
    return shlex.join(["orchestrator", *words])


# --- commands ------------------------------------------------------------------------------


def cmd_launch(args, argv) -> int:
    from orchestrator.config import load_config
    from orchestrator.driver import launch

    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)  # `launch --script X a.b=1`: the first override, not a config file
        args.config = None
    if args.script:  # a script without a config file: the defaults, its path, its arguments
        overrides += [f"entrypoint.script={Path(args.script).absolute()}", f"entrypoint.args={json.dumps(args.script_args)}"]
        if args.workers is not None:
            overrides.append(f"scaling.num_workers={args.workers}")
        if not any(o.startswith("run.name=") for o in overrides):
            overrides.append(f"run.name={Path(args.script).stem}")
    elif args.config is None:
        raise UserError("orchestrator launch: give a config file, or --script PATH (see `orchestrator launch --help`)")
    elif args.workers is not None or args.script_args:
        raise UserError("orchestrator launch: --workers and arguments after -- go with --script")
    if args.resume_if_exists:
        overrides.append("run.resume=auto")
    cfg = load_config(args.config, overrides)
    if args.detach:
        from orchestrator import detach
        from orchestrator.driver import new_run_id
        from orchestrator.store import Store

        address = args.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise UserError("orchestrator launch --detach: give the cluster with --address (or $RAY_ADDRESS); "
                            "a detached run needs a Ray cluster that outlives this command")
        if args.script:
            raise UserError("orchestrator launch --detach: give a config file (the job re-reads it); --script is "
                            "for attached runs")
        detach.submit(cfg, args.config, overrides, address=address, run_id=new_run_id(cfg.run.name),
                      store_root=Store().root, command=stored_command(argv), out=out)
        return 0
    launch(cfg, address=args.address, command=stored_command(argv), out=out, run_id=args.run_id)
    return 0


def cmd_validate(args, argv) -> int:
    from orchestrator.config import load_config
    from orchestrator.validate import run_checks

    cfg = load_config(args.config, args.overrides)  # a config problem is the one problem: nothing else can run
    out(f"ok: config {args.config}" + (f" with {len(args.overrides)} override(s)" if args.overrides else ""))
    problems = 0
    for check in run_checks(cfg, address=args.address):
        if check.status == "error":
            problems += 1
            print(f"error: {one_line(check.message)}", file=sys.stderr)
        else:
            out(f"{check.status}: {one_line(check.message)}")
    return 2 if problems else 0



def cmd_checkpoints(args, argv) -> int:
    from orchestrator.checkpoint_views import checkpoint_report, report_rows

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
         command=stored_command(argv), out=out)
    return 0


def cmd_server(args, argv) -> int:
    from orchestrator.ui.server import new_token, serve

    # a service's token comes from its environment ($ORCHESTRATOR_TOKEN, as clients take it), not argv
    token = new_token() if args.token == "" else (args.token or os.environ.get("ORCHESTRATOR_TOKEN") or None)
    serve(host=args.host, port=args.port, token=token, out=out, show_token=args.token is not None)
    return 0


def cmd_data(args, argv) -> int:
    from dataloading.prepare import prepare

    include = [s.strip() for s in args.include.split(",") if s.strip()]
    prepare(args.sources, args.out, seq_len=args.seq_len, val_fraction=args.val_fraction, include=include,
            shard_mb=args.shard_mb, text_field=args.text_field, tokenizer=args.tokenizer,
            train_tokenizer=args.train_tokenizer, eos=args.eos, log=out)
    return 0


COMMANDS = {
    "launch": cmd_launch, "validate": cmd_validate, "resume": cmd_resume, "fork": cmd_fork, "data": cmd_data,
    "checkpoints": cmd_checkpoints, "server": cmd_server, "ui": cmd_server,
    "runs": run_views.cmd_runs, "show": run_views.cmd_show, "metrics": run_views.cmd_metrics,
    "compare": run_views.cmd_compare, "tag": run_views.cmd_tag, "note": run_views.cmd_note,
    "diagnose": diagnose_view.cmd_diagnose, "logs": log_view.cmd_logs, "attach": log_view.cmd_attach,
    "stop": log_view.cmd_stop, "store": lambda args, argv: store_cli.cmd_store(args, argv, out=out),
    "import": transfer_cli.cmd_import, "export": transfer_cli.cmd_export,
}

if __name__ == "__main__":
    sys.exit(main())
