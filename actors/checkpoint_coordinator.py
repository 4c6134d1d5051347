"""One per run: hands out write slots, collects each rank's shard reports, records outcomes.

Every method returns at once (a plain, single-threaded actor): ranks poll for a slot and rank 0
polls for the other ranks' reports, so no call ever blocks the actor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checkpointing.layout import MANIFEST, scan, step_dir
from checkpointing.records import CheckpointRecords
from checkpointing.slots import SlotTable
from checkpointing.storage import check_destination, open_fs, resolve_uri


class CheckpointCoordinator:
    def __init__(self, run_id: str, uri: str, world_size: int, *, max_concurrent_writes: int, per_node_writes: int,
                 slot_lease_s: float, store_root: str | None = None, clock: Callable[[], float] = time.monotonic,
                 storage_options: dict | None = None):
        self.run_id = run_id
        self.uri = uri
        self.storage_options = storage_options or {}
        self.world_size = world_size
        self.slots = SlotTable(max_global=max_concurrent_writes, per_node=per_node_writes, lease_s=slot_lease_s,
                               clock=clock)
        self.reports: dict[int, dict[int, dict[str, Any]]] = {}
        self.records = CheckpointRecords(Path(store_root) / "store.db") if store_root else None
        self.outcomes: list[dict[str, Any]] = []

    def info(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri, "world_size": self.world_size}

    def join(self, rank: int) -> dict[str, Any]:
        """A rank starts (again, after a restart): drop what an earlier incarnation of it left
        behind, its slots and its reports for uncommitted steps, so a new commit never mixes
        attempts. Returns info()."""
        self.slots.release_rank(rank)
        for reports in self.reports.values():
            reports.pop(rank, None)
        return self.info()

    # --- slots ------------------------------------------------------------------------------

    def acquire(self, rank: int, node: str) -> int | None:
        return self.slots.acquire(rank, node)

    def release(self, slot_id: int) -> bool:
        return self.slots.release(slot_id)

    def release_rank(self, rank: int) -> int:
        return self.slots.release_rank(rank)

    def stats(self) -> dict[str, int]:
        return {"in_flight": self.slots.in_flight(), "peak": self.slots.peak, "granted": self.slots.granted,
                "reclaimed": self.slots.reclaimed}

    # --- commit -----------------------------------------------------------------------------

    def report(self, step: int, rank: int, result: dict[str, Any]) -> None:
        """result: {"files": [...], "bytes", "blocked_s", "upload_s"} or {"error": "..."}."""
        self.reports.setdefault(step, {})[rank] = result

    def shards(self, step: int) -> dict[int, dict[str, Any]]:
        return dict(self.reports.get(step, {}))

    def finish(self, step: int, status: str, *, bytes: int | None = None, blocked_s: float | None = None,
               upload_s: float | None = None, uri: str | None = None, error: str | None = None) -> None:
        """Rank 0's verdict on a checkpoint: committed or failed (the alert). Forgets the reports."""
        self.reports.pop(step, None)
        outcome = {"step": step, "status": status, "bytes": bytes, "blocked_s": blocked_s, "upload_s": upload_s,
                   "uri": uri, "error": error}
        self.outcomes.append(outcome)
        if self.records is not None:
            self.records.add(run_id=self.run_id, **outcome)

    def history(self) -> list[dict[str, Any]]:
        return list(self.outcomes)

    def retire_after(self, step: int, reason: str) -> list[int]:
        """Uncommit every checkpoint after `step` (its manifest removed, so no restore takes it;
        retention deletes the rest) and record why. Returns the retired steps."""
        fs, root = open_fs(self.uri, self.storage_options)
        retired = [s for s in scan(fs, root).committed if s > step]
        for s in retired:
            fs.rm_file(f"{root.rstrip('/')}/{step_dir(s)}/{MANIFEST}")
            self.corrupt(s, f"retired: {reason}")
        return retired

    def corrupt(self, step: int, reason: str) -> None:
        """A restore found the committed checkpoint of `step` corrupt: mark it so in the store."""
        if self.records is not None:
            self.records.mark_corrupt(run_id=self.run_id, step=step, uri=f"{self.uri.rstrip('/')}/{step_dir(step)}",
                                      error=reason)


def start(cfg, run_id: str, store_root: str, node_id: str):
    """Check the destination, then start the run's coordinator (no CPU) on the driver's node,
    next to the store file it records into. Returns the actor handle. (Failed checkpoints become
    alerts through the `ckpt/failed` metric the writer logs.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c = cfg.checkpoint
    uri = resolve_uri(c.uri, run_id, store_root)
    check_destination(uri, c.storage_options)
    return ray.remote(CheckpointCoordinator).options(
        name=f"{cfg.run.name}:{run_id}:checkpoints", num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(run_id, uri, cfg.scaling.num_workers, max_concurrent_writes=c.max_concurrent_writes,
             per_node_writes=c.per_node_writes, slot_lease_s=c.slot_lease_s, store_root=str(store_root),
             storage_options=c.storage_options)
