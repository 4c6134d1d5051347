"""The `import` and `export` commands: their arguments and what they do (tb_import.py, export.py)."""

from __future__ import annotations

import shlex
import sys

from common.errors import UserError
from orchestrator.config import scrub_text


def add_parsers(sub, parser_class) -> None:
    imp = sub.add_parser("import", help="make runs from another tracker's files: TensorBoard event files (scalars)")
    imp.add_argument("source", choices=["tensorboard"], help="what the files are")
    imp.add_argument("dir", metavar="DIR", help="a directory of event files (one run per directory holding them)")
    imp.add_argument("--name", help="run name (default: DIR's name; runs of subdirectories add their path)")
    exp = sub.add_parser("export", help="every point of a run (run, key, rank, attempt, step, value, wall_time)")
    exp.add_argument("run")
    exp.add_argument("--format", required=True, choices=["parquet", "csv"])
    exp.add_argument("--out", metavar="PATH", help="destination file (default: RUN.FORMAT here; - for csv on stdout)")
    exp.add_argument("--key", action="append", metavar="K", help="only this metric (repeatable)")
    exp.add_argument("--force", action="store_true", help="replace the destination if it exists")


def _store(create: bool):
    from orchestrator.store import open_store

    store = open_store(create=create)
    if create and getattr(store, "kind", None) not in ("sqlite", "postgresql"):  # export reads through a server too
        store.close()
        raise UserError("import writes points directly: name a SQLite or PostgreSQL store "
                        "(--store / $ORCHESTRATOR_STORE), not an orchestrator server")
    return store


def cmd_import(args, argv) -> int:
    from orchestrator.tb_import import import_tensorboard

    store = _store(create=True)
    try:
        import_tensorboard(store, args.dir, name=args.name, command=scrub_text(shlex.join(["orchestrator", *argv])),
                           out=lambda line: print(line, flush=True),
                           warn=lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
    finally:
        store.close()
    return 0


def cmd_export(args, argv) -> int:
    from orchestrator.export import export_run

    store = _store(create=False)
    try:
        r = export_run(store, args.run, fmt=args.format, out=args.out, keys=args.key, force=args.force)
    finally:
        store.close()
    line = f"exported {r['points']} points of {r['keys']} key(s) of run {r['run']} to {r['out']}"
    print(line, file=sys.stderr if r["out"] == "-" else sys.stdout, flush=True)
    return 0
