"""`orchestrator import tensorboard DIR [--name NAME]`: TensorBoard scalars into the store.

One run per directory that holds event files (`*tfevents*`): DIR itself and every directory
under it (TensorBoard's own convention: `logs/train`, `logs/eval` are two runs). The run is
named NAME (default: DIR's name), followed by the subdirectory for those below DIR. Tags become
metric keys, at rank 0, steps and wall times kept; a step written again (a restarted writer)
keeps every value (logged_points.py). Problems in a file (corrupt or truncated records) are one
line each, naming the file and the byte offset; the rest is imported. The command fails only
when nothing could be read.
"""

from __future__ import annotations

import socket
from pathlib import Path

from common.errors import DataError, UserError
from orchestrator.logged_points import PointWriter, new_run_id
from orchestrator.tensorboard import read_directory


def event_dirs(root: Path) -> dict[Path, list[Path]]:
    """{directory: its event files, sorted by name (the name starts with the creation time)}."""
    found: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("*tfevents*")):
        if path.is_file():
            found.setdefault(path.parent, []).append(path)
    return found


def run_name(root: Path, folder: Path, name: str | None) -> str:
    base = name or root.resolve().name or "tensorboard"
    rel = folder.relative_to(root).as_posix()
    return base if rel == "." else f"{base}/{rel}"


def import_tensorboard(store, root: str, *, name: str | None = None, command: str = "",
                       out=print, warn=print) -> list[dict]:
    """Import every event directory under `root`; returns one summary per run made."""
    path = Path(root)
    if not path.exists():
        raise UserError(f"import tensorboard: {root} does not exist; expected a directory of TensorBoard event "
                        "files (events.out.tfevents.*)")
    if path.is_file():
        found = {path.parent: [path]}
        path = path.parent
    else:
        found = event_dirs(path)
    if not found:
        raise UserError(f"import tensorboard: no event files (names containing 'tfevents') under {root}")
    writer = PointWriter(store)
    made = []
    problems_total = 0
    for folder, files in found.items():
        problems: list[str] = []
        scalars = read_directory(files, problems)
        for line in problems:
            warn(line)
        problems_total += len(problems)
        if not scalars.rows:
            warn(f"{folder}: no scalars in {len(files)} event file(s) ({scalars.events} events, "
                 f"{scalars.skipped} non-scalar values); no run made")
            continue
        made.append(_import_run(store, writer, root=path, folder=folder, files=files, scalars=scalars,
                                name=name, command=command))
        r = made[-1]
        out(f"imported {r['points']} points of {r['keys']} keys from {len(files)} file(s) in {folder} as run {r['id']}"
            + (f" ({scalars.skipped} non-scalar values skipped)" if scalars.skipped else ""))
    if not made:
        raise DataError(f"import tensorboard: nothing could be read under {root}"
                        + (f" ({problems_total} problem(s) above)" if problems_total else " (no scalars)"))
    return made


def _import_run(store, writer: PointWriter, *, root: Path, folder: Path, files: list[Path], scalars,
                name: str | None, command: str) -> dict:
    run_name_ = run_name(root, folder, name)
    run_id = new_run_id(run_name_)
    walls = [w for _, _, _, w in scalars.rows if w == w]
    meta = {"source": "tensorboard", "path": str(folder.resolve()), "files": [p.name for p in files],
            "first_wall_time": min(walls) if walls else None, "last_wall_time": max(walls) if walls else None}
    store.create_run(run_id=run_id, name=run_name_, config={}, git_commit=None, host=socket.gethostname(),
                     command=command or f"orchestrator import tensorboard {root}", world_size=1, meta=meta,
                     tags={"source": "tensorboard"})
    try:
        writer.write(run_id, scalars.rows)
    except BaseException as e:
        store.finish_run(run_id, "failed", error=f"import stopped: {e}")
        raise
    store.finish_run(run_id, "completed")
    return {"id": run_id, "name": run_name_, "points": len(scalars.rows),
            "keys": len({k for k, _, _, _ in scalars.rows}), "skipped": scalars.skipped}
