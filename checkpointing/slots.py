"""Write slots: at most `max_global` writes in flight across the run and `per_node` per node.

Pure bookkeeping with an injectable clock, so the coordinator actor stays a thin wrapper and the
rules are tested without Ray. A slot that is not released within `lease_s` is reclaimed: a dead
rank must not hold one forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Lease:
    rank: int
    node: str
    expires: float


class SlotTable:
    def __init__(self, *, max_global: int, per_node: int, lease_s: float,
                 clock: Callable[[], float] = time.monotonic):
        if max_global < 1 or per_node < 1:
            raise ValueError(f"slot limits must be >= 1, got max_global={max_global}, per_node={per_node}")
        self.max_global = max_global
        self.per_node = per_node
        self.lease_s = lease_s
        self.clock = clock
        self.leases: dict[int, Lease] = {}
        self.next_id = 1
        self.peak = 0
        self.granted = 0
        self.reclaimed = 0

    def _expire(self) -> None:
        now = self.clock()
        for slot_id in [s for s, lease in self.leases.items() if lease.expires <= now]:
            del self.leases[slot_id]
            self.reclaimed += 1

    def acquire(self, rank: int, node: str) -> int | None:
        """A slot id, or None when the run or this node is at its limit (ask again later)."""
        self._expire()
        if len(self.leases) >= self.max_global:
            return None
        if sum(1 for lease in self.leases.values() if lease.node == node) >= self.per_node:
            return None
        slot_id, self.next_id = self.next_id, self.next_id + 1
        self.leases[slot_id] = Lease(rank=rank, node=node, expires=self.clock() + self.lease_s)
        self.granted += 1
        self.peak = max(self.peak, len(self.leases))
        return slot_id

    def release(self, slot_id: int) -> bool:
        """False when the lease had already expired (harmless)."""
        return self.leases.pop(slot_id, None) is not None

    def release_rank(self, rank: int) -> int:
        """Drop every slot a (dead or restarted) rank holds; returns how many."""
        mine = [s for s, lease in self.leases.items() if lease.rank == rank]
        for s in mine:
            del self.leases[s]
        return len(mine)

    def in_flight(self) -> int:
        self._expire()
        return len(self.leases)
