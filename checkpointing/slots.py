"""Write slots: at most `max_global` writes in flight across the run and `per_node` per node.

Pure bookkeeping with an injectable clock, so the coordinator actor stays a thin wrapper and the
rules are tested without Ray. A slot that is not released within `lease_s` is reclaimed: a dead
rank must not hold one forever.

Requests either ask once (`acquire`: a slot or None) or queue (`wait`, then `serve` hands out
slots as they free up, oldest request first): at 1,024 ranks, ranks polling for a slot sent the
coordinator thousands of calls a second and slots sat idle between polls.
"""

from __future__ import annotations

import collections
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
        # node -> {ticket: rank}, oldest first; one queue per node, so a full node does not hold up the others
        self.queues: dict[str, collections.OrderedDict[int, int]] = {}
        self.next_ticket = 1

    def _expire(self) -> None:
        now = self.clock()
        for slot_id in [s for s, lease in self.leases.items() if lease.expires <= now]:
            del self.leases[slot_id]
            self.reclaimed += 1

    def _on_node(self, node: str) -> int:
        return sum(1 for lease in self.leases.values() if lease.node == node)

    def _lease(self, rank: int, node: str) -> int:
        slot_id, self.next_id = self.next_id, self.next_id + 1
        self.leases[slot_id] = Lease(rank=rank, node=node, expires=self.clock() + self.lease_s)
        self.granted += 1
        self.peak = max(self.peak, len(self.leases))
        return slot_id

    def acquire(self, rank: int, node: str) -> int | None:
        """A slot id, or None when the run or this node is at its limit (ask again later), or when
        a queued request could take the free slot (they go first: `serve` hands it to them)."""
        self._expire()
        if self._servable() or len(self.leases) >= self.max_global or self._on_node(node) >= self.per_node:
            return None
        return self._lease(rank, node)

    def _servable(self) -> bool:
        if len(self.leases) >= self.max_global:
            return False
        return any(q and self._on_node(node) < self.per_node for node, q in self.queues.items())

    def wait(self, rank: int, node: str) -> int:
        """Queue a request; returns its ticket. `serve` grants it when a slot is free for it."""
        ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
        self.queues.setdefault(node, collections.OrderedDict())[ticket] = rank
        return ticket

    def serve(self) -> list[tuple[int, int]]:
        """Grant free slots to queued requests, oldest first among the nodes with room.
        Returns [(ticket, slot id)]."""
        self._expire()
        granted = []
        while len(self.leases) < self.max_global:
            heads = [(next(iter(q)), node) for node, q in self.queues.items()
                     if q and self._on_node(node) < self.per_node]
            if not heads:
                break
            ticket, node = min(heads)
            rank = self.queues[node].pop(ticket)
            granted.append((ticket, self._lease(rank, node)))
        return granted

    def cancel(self, ticket: int) -> bool:
        """Withdraw a queued request (its caller gave up); False if it was not queued."""
        for q in self.queues.values():
            if q.pop(ticket, None) is not None:
                return True
        return False

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def next_expiry(self) -> float | None:
        """When the oldest lease runs out (a dead rank's slot comes back), or None without leases."""
        return min((lease.expires for lease in self.leases.values()), default=None)

    def release(self, slot_id: int) -> bool:
        """False when the lease had already expired (harmless)."""
        return self.leases.pop(slot_id, None) is not None

    def release_rank(self, rank: int) -> int:
        """Drop every slot a (dead or restarted) rank holds; returns how many. Its queued requests
        go too (see drop_waiting)."""
        mine = [s for s, lease in self.leases.items() if lease.rank == rank]
        for s in mine:
            del self.leases[s]
        return len(mine)

    def drop_waiting(self, rank: int) -> list[int]:
        """Withdraw every queued request of a (dead or restarted) rank; returns their tickets."""
        dropped = []
        for q in self.queues.values():
            for ticket in [t for t, r in q.items() if r == rank]:
                del q[ticket]
                dropped.append(ticket)
        return dropped

    def in_flight(self) -> int:
        self._expire()
        return len(self.leases)
