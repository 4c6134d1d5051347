"""Logging from user code on any rank: `from orchestrator import telemetry; telemetry.log({...})`.

Works inside a training worker (a model built by `model.factory`, a hook it calls). Logging
only appends to an in-memory buffer; a background thread ships batches to the metrics actor,
so thousands of keys per step (per-layer figures, say) cost the training step next to nothing.
"""

from __future__ import annotations

_sender = None
_step = 0  # the step the training loop is in; set at the top of every iteration


def attach(sender) -> None:
    """Called by the train worker with its MetricSender (None to detach)."""
    global _sender
    _sender = sender


def set_step(step: int) -> None:
    global _step
    _step = step


def log(metrics: dict[str, float], *, step: int | None = None) -> None:
    """Record metrics for this rank; `step` defaults to the current training step."""
    if _sender is None:
        raise RuntimeError("orchestrator.telemetry.log works inside a training worker started by `orchestrator launch`")
    _sender.log(metrics, step=_step if step is None else step)
