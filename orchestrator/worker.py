"""Optional, from inside a script that `orchestrator launch` runs (entrypoint.script):

    from orchestrator import worker
    worker.log({"train/loss": loss.item()}, step=step)

feeds tracking (charts, alerts) and the stall watchdog. Outside such a run it does nothing and
costs nothing, so the same script still runs under torchrun or plain python.
"""

from __future__ import annotations

import json
import os

_fd = os.environ.get("ORCHESTRATOR_WORKER_FD")
_out = None


def log(metrics: dict, *, step: int) -> None:
    """Numbers of step `step` (0-based) for this rank."""
    global _out
    if _fd is None:
        return
    if _out is None:
        _out = os.fdopen(int(_fd), "w", buffering=1)  # line-buffered: each call arrives at once
    _out.write(json.dumps({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")
