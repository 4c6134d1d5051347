"""One per run: hands out write slots, collects each rank's shard reports, records outcomes.

An asyncio actor (one thread): every method but `acquire_wait` returns at once. A rank's slot
request waits in the coordinator (`acquire_wait`) until a slot frees up for it, instead of
polling: at 1,024 ranks the polls were thousands of calls a second (bench/control_plane.py).
Rank 0 polls for the other ranks' reports.
"""

from __future__ import annotations

import asyncio
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
                 storage_options: dict | None = None, open_records: Callable[[], Any] | None = None):
        """open_records() -> the store's CheckpointRecords (a PostgreSQL store's too); without it,
        the SQLite store.db in store_root."""
        self.run_id = run_id
        self.uri = uri
        self.storage_options = storage_options or {}
        self.world_size = world_size
        self.slots = SlotTable(max_global=max_concurrent_writes, per_node=per_node_writes, lease_s=slot_lease_s,
                               clock=clock)
        self.waiters: dict[int, asyncio.Future] = {}  # ticket -> the waiting acquire_wait call
        self.timer: asyncio.TimerHandle | None = None  # wakes the queue when the oldest lease expires
        self.reports: dict[int, dict[int, dict[str, Any]]] = {}
        self.records = (open_records() if open_records else
                        CheckpointRecords(Path(store_root) / "store.db") if store_root else None)
        self.outcomes: list[dict[str, Any]] = []

    def info(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri, "world_size": self.world_size}

    def join(self, rank: int) -> dict[str, Any]:
        """A rank starts (again, after a restart): drop what an earlier incarnation of it left
        behind, its slots and its reports for uncommitted steps, so a new commit never mixes
        attempts. Returns info()."""
        self.release_rank(rank)
        for reports in self.reports.values():
            reports.pop(rank, None)
        return self.info()

    # --- slots ------------------------------------------------------------------------------

    def acquire(self, rank: int, node: str) -> int | None:
        """A slot now, or None (in-process callers poll: tests, benches without Ray)."""
        return self.slots.acquire(rank, node)

    async def acquire_wait(self, rank: int, node: str, timeout_s: float) -> int | None:
        """A slot as soon as one is free for this rank (oldest request first), or None after timeout_s."""
        ticket = self.slots.wait(rank, node)
        granted = self.waiters[ticket] = asyncio.get_running_loop().create_future()
        self._serve()
        try:
            return await asyncio.wait_for(asyncio.shield(granted), timeout_s)
        except asyncio.TimeoutError:
            self.slots.cancel(ticket)
            return granted.result() if granted.done() else None  # granted as the wait ran out: keep it
        except asyncio.CancelledError:  # the call was cancelled: a slot it got goes back
            self.slots.cancel(ticket)
            if granted.done():
                self.release(granted.result())
            raise
        finally:
            self.waiters.pop(ticket, None)

    def _serve(self) -> None:
        """Hand free slots to the queued requests; wake again when the oldest lease expires."""
        for ticket, slot_id in self.slots.serve():
            waiter = self.waiters.get(ticket)
            if waiter is not None and not waiter.done():
                waiter.set_result(slot_id)
            else:  # its caller is gone
                self.slots.release(slot_id)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        expiry = self.slots.next_expiry()
        if self.waiters and self.slots.waiting() and expiry is not None:
            self.timer = asyncio.get_running_loop().call_later(max(0.0, expiry - self.slots.clock()) + 0.01,
                                                               self._serve)

    def release(self, slot_id: int) -> bool:
        released = self.slots.release(slot_id)
        self._serve()
        return released

    def release_rank(self, rank: int) -> int:
        """Everything a dead or restarted rank held or waited for."""
        for ticket in self.slots.drop_waiting(rank):
            waiter = self.waiters.get(ticket)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        released = self.slots.release_rank(rank)
        self._serve()
        return released

    def stats(self) -> dict[str, int]:
        return {"in_flight": self.slots.in_flight(), "peak": self.slots.peak, "granted": self.slots.granted,
                "reclaimed": self.slots.reclaimed, "waiting": self.slots.waiting(),
                "holders": sorted(lease.rank for lease in self.slots.leases.values())}

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

    def close(self) -> None:
        """Before the actor is killed: records queued for a tracking server go out."""
        if self.records is not None:
            self.records.close()
            self.records = None

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


def max_calls(world_size: int) -> int:
    """Concurrent calls the actor takes: a waiting slot request from every rank, and room to spare."""
    return 1000 + 2 * world_size


def start(cfg, run_id: str, store_root: str, node_id: str, open_records: Callable[[], Any] | None = None):
    """Check the destination, then start the run's coordinator (no CPU) on the driver's node,
    next to the store file it records into. Returns the actor handle. (Failed checkpoints become
    alerts through the `ckpt/failed` metric the writer logs.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    c = cfg.checkpoint
    uri = resolve_uri(c.uri, run_id, store_root)
    check_destination(uri, c.storage_options)
    return ray.remote(CheckpointCoordinator).options(
        name=f"{cfg.run.name}:{run_id}:checkpoints", num_cpus=0, max_concurrency=max_calls(cfg.scaling.num_workers),
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(run_id, uri, cfg.scaling.num_workers, max_concurrent_writes=c.max_concurrent_writes,
             per_node_writes=c.per_node_writes, slot_lease_s=c.slot_lease_s, store_root=str(store_root),
             storage_options=c.storage_options, open_records=open_records)
