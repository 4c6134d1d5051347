"""`orchestrator export RUN --format parquet|csv [--out PATH] [--key K ...]`: every stored point
of a run in long format, one row per point:

    run, key, rank, attempt, step, value, wall_time

`attempt` as stored (a restarted run has steps replayed under a later attempt; a step logged
twice through MLflow or TensorBoard is in attempts 0, 1, ...); `wall_time` in unix seconds where
the store keeps it (MLflow and TensorBoard points), empty otherwise. The run's own points only:
a fork's inherited history is its parent's to export. Rows are ordered by key, rank, attempt,
step. The file is written beside its destination and renamed into place, so a failed export
never leaves half a file; an existing file is replaced only with --force.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from common.errors import UserError
from orchestrator.logged_points import wall_times

SCHEMA = pa.schema([("run", pa.string()), ("key", pa.string()), ("rank", pa.int32()), ("attempt", pa.int32()),
                    ("step", pa.int64()), ("value", pa.float64()), ("wall_time", pa.float64())])
FORMATS = ("parquet", "csv")


def tables(store, run_id: str, keys: list[str]):
    """One arrow table per stored series, in export order."""
    for key in keys:
        for sid, rank, attempt, _ in store.points.find(run_id, key):
            p = store.points.read(sid)
            if not len(p.steps):
                continue
            n = len(p.steps)
            walls = wall_times(store, run_id, key, rank, attempt, p.steps)
            yield pa.table({
                "run": pa.array([run_id] * n, pa.string()), "key": pa.array([key] * n, pa.string()),
                "rank": pa.array(np.full(n, rank, np.int32)), "attempt": pa.array(np.full(n, attempt, np.int32)),
                "step": pa.array(p.steps), "value": pa.array(p.values),
                "wall_time": pa.array(walls, mask=np.isnan(walls)),
            }, schema=SCHEMA)


def export_run(store, ref: str, *, fmt: str, out: str | None = None, keys: list[str] | None = None,
               force: bool = False) -> dict:
    if fmt not in FORMATS:
        raise UserError(f"export: --format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run = store.run(ref)
    have = store.points.keys(run["id"])
    for key in keys or []:
        if key not in have:
            close = difflib.get_close_matches(key, have, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (keys: {', '.join(have[:20]) or 'none'})"
            raise UserError(f"export: run {run['id']} has no points of {key!r}{hint}")
    chosen = list(dict.fromkeys(keys)) if keys else have
    if out == "-":
        if fmt != "csv":
            raise UserError("export: --out - (standard output) is for --format csv; parquet needs a file")
        points = _write(chosen, store, run["id"], fmt, sys.stdout.buffer)
        sys.stdout.flush()
        return {"run": run["id"], "out": "-", "points": points, "keys": len(chosen)}
    dest = Path(out or f"{run['id']}.{fmt}")
    if dest.is_dir():
        raise UserError(f"export: {dest} is a directory; give a file name with --out")
    if dest.exists() and not force:
        raise UserError(f"export: {dest} exists; add --force to replace it, or choose another --out")
    if not dest.parent.is_dir():
        raise UserError(f"export: the directory {dest.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            points = _write(chosen, store, run["id"], fmt, f)
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"export: cannot write {dest}: {e.strerror or e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return {"run": run["id"], "out": str(dest), "points": points, "keys": len(chosen)}


def _write(keys: list[str], store, run_id: str, fmt: str, sink) -> int:
    writer = pq.ParquetWriter(sink, SCHEMA) if fmt == "parquet" else pacsv.CSVWriter(sink, SCHEMA)
    points = 0
    try:
        for table in tables(store, run_id, keys):
            writer.write_table(table)
            points += table.num_rows
    finally:
        writer.close()
    return points
