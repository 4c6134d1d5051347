"""`orchestrator checkpoints RUN`: every checkpoint of a run, committed, failed or corrupt.

Outcomes come from the tracking store (failed attempts leave no manifest behind); the
destination is scanned too, so `present` says whether retention kept a committed one, and
`--verify` re-reads every file and marks mismatches corrupt.
"""

from __future__ import annotations

from typing import Any

from checkpointing.errors import CorruptCheckpoint
from checkpointing.layout import read_manifest, scan, verify
from checkpointing.storage import open_fs, resolve_uri
from orchestrator.config import REDACTED
from orchestrator.store import open_store


def checkpoint_report(run_ref: str, *, store=None, check: bool = False) -> dict[str, Any]:
    store = store or open_store()
    run = store.run(run_ref)
    section = run["config"].get("checkpoint", {})
    uri = resolve_uri(section.get("uri"), run["id"], store.root)
    # secrets were redacted in the stored config; credentials then come from the environment
    options = _without_redacted(section.get("storage_options") or {})
    records = store.checkpoint_records()
    try:
        rows = {r["step"]: {**r, "present": False} for r in records.list(run["id"])}
        location_error = None
        try:
            fs, root = open_fs(uri, options)
            committed = scan(fs, root).committed
        except Exception as e:  # an unreachable destination still lists what the store knows
            fs = root = None
            committed = []
            location_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        for step in committed:
            row = rows.get(step)
            if row is None:  # committed by a writer that had no store (or another one)
                m = read_manifest(fs, root, step)
                row = rows[step] = {"run_id": run["id"], "step": step, "status": "committed", "bytes": m.get("bytes"),
                                    "blocked_s": m.get("timings", {}).get("blocked_s"),
                                    "upload_s": m.get("timings", {}).get("upload_s"),
                                    "uri": f"{uri.rstrip('/')}/step_{step:08d}", "error": None,
                                    "time": m.get("committed_at")}
            row["present"] = True
            if check and row["status"] == "committed":
                try:
                    verify(fs, root, step)
                except CorruptCheckpoint as e:
                    row["status"], row["error"] = "corrupt", e.reason
                    records.mark_corrupt(run_id=run["id"], step=step, uri=row["uri"], error=e.reason)
    finally:
        records.close()  # every UI request calls this: never leave a connection behind
    return {"run": run["id"], "uri": uri, "location_error": location_error,
            "checkpoints": [rows[s] for s in sorted(rows)]}


def _without_redacted(options):
    """Storage options as stored: secrets (any depth) were redacted; those then come from the environment."""
    if isinstance(options, dict):
        return {k: _without_redacted(v) for k, v in options.items() if v != REDACTED}
    return {} if options == REDACTED else options


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def report_rows(report: dict[str, Any]) -> list[tuple]:
    rows = [("STEP", "STATUS", "SIZE", "BLOCKED", "UPLOAD", "KEPT", "ERROR")]
    for c in report["checkpoints"]:
        kept = "yes" if c["present"] else "?" if report["location_error"] else "deleted" if c["status"] == "committed" else "-"
        rows.append((c["step"], c["status"], fmt_bytes(c["bytes"]), fmt_s(c["blocked_s"]), fmt_s(c["upload_s"]),
                     kept, c["error"] or ""))
    return rows
