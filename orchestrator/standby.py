"""Warm spare workers (fault_tolerance.standby_workers): worker processes that have already
imported torch and the rank's modules, idle on the nodes where a restarted group will want them.
A restart takes a spare instead of starting a process that imports torch (about 2 s of CPU per
rank, and a group waits for its slowest rank); the pool fills again once the new group trains.

Where spares wait: one per rank on that rank's node (a whole group can be replaced warm), and on
each other node with room for a worker as many as the busiest node has ranks (a lost or avoided
node's ranks land on one of them), at most as many in all as the group has ranks.

A spare asks Ray for no CPU: it runs only once it replaces a rank, on the CPU that rank's
placement-group bundle holds and no process of its own uses. It warms up at the niceness Ray gives
workers, so the training ranks go first; on a busy node that can take longer than the time to the
next failure. A restart that finds no warm spare on a node takes one still warming up and boosts it
to a rank's priority: it finishes its imports at full speed, which beats a new process that starts
them all over. Spares are for CPU ranks: Ray hides
every GPU from an actor that asked for none (CUDA_VISIBLE_DEVICES=""), so a GPU rank still gets a
new worker in its bundle."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import ray

from orchestrator import cluster

PING_S = 10.0  # a spare that does not answer this fast at a restart is dropped, and a new worker started


class Standby:
    def __init__(self, prefix: str, make: Callable[[str, str], object], warm: Callable[[object], object],
                 boost: Callable[[object], object] | None = None):
        """make(name, node_id): a new worker actor on that node asking for no resources;
        warm(worker): the ref of its warm-up call; boost(worker): the ref of a call, beside the
        warm-up, that gives the worker a rank's priority (none: a warming spare is never taken)."""
        self.prefix, self.make, self.warm, self.boost = prefix, make, warm, boost
        self.spares: dict[str, list[tuple[object, object]]] = {}  # node -> (worker, its warm-up's ref)
        self.made = 0
        self.used = 0
        self.boosted = 0  # of the last take's spares, those taken still warming up
        self.warming: tuple[float, list] | None = None  # the last fill: when, and its warm-ups' refs

    def wanted(self, group_nodes: list[str], bundle: dict[str, float]) -> dict[str, int]:
        """node -> spares it should hold, given each rank's node and one worker's bundle."""
        per_node = collections.Counter(group_nodes)
        want = dict(per_node)
        busiest, left = max(per_node.values(), default=0), len(group_nodes)
        for n in sorted(ray.nodes(), key=lambda n: n["NodeID"]):
            node = n["NodeID"]
            if left <= 0 or not n.get("Alive") or node in per_node:
                continue
            # its size, not what is free now: room for a group after a restart
            room = cluster.bundles_fit(n.get("Resources", {}), bundle) if bundle else 0
            if room > 0:
                want[node] = min(room, busiest, left)
                left -= want[node]
        return want

    def fill(self, want: dict[str, int]) -> int:
        """Start spares until every node holds what `want` says (keeping the ones it has), and
        drop those on nodes that are gone. Returns how many were started."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for node in [n for n in self.spares if n not in alive]:
            self._kill(self.spares.pop(node))
        refs = []
        for node, n in want.items():
            pool = self.spares.setdefault(node, [])
            while len(pool) < n:
                w = self.make(f"{self.prefix}:standby{self.made}", node)
                self.made += 1
                pool.append((w, self.warm(w)))
                refs.append(pool[-1][1])
        if refs:
            self.warming = (time.monotonic(), refs)
        return len(refs)

    def warmed(self) -> tuple[int, float] | None:
        """(spares, seconds) once every spare of the last fill has finished warming up; once."""
        if self.warming is None:
            return None
        t0, refs = self.warming
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(done) < len(refs):
            return None
        self.warming = None
        return len(refs), time.monotonic() - t0

    def take(self, nodes: list[str]) -> list[object | None]:
        """A spare for each of `nodes` (a node may repeat), or None where there is none: a warm one
        first, else one still warming up (boosted, see the module's doc); one that does not answer
        is dropped."""
        chosen: list[object | None] = []
        pings, boosted = {}, set()
        for i, node in enumerate(nodes):
            pool = self.spares.get(node, [])
            done = [j for j, (_, ref) in enumerate(pool) if ray.wait([ref], timeout=0)[0]]
            if done:
                w, _ = pool.pop(done[0])
                pings[i] = w.node_info.remote()  # its warm-up's error, if any, shows at the rendezvous
            elif pool and self.boost is not None:
                w, _ = pool.pop(0)
                pings[i] = self.boost(w)  # answered beside the warm-up, which it speeds up
                boosted.add(i)
            else:
                w = None
            chosen.append(w)
        if pings:
            done, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=PING_S)
            for i, ref in pings.items():
                try:
                    if ref not in done:
                        raise TimeoutError
                    ray.get(ref)
                except Exception:  # a dead or stuck spare: a new worker instead
                    self._kill([(chosen[i], None)])
                    chosen[i] = None
        taken = {i for i, w in enumerate(chosen) if w is not None}
        self.boosted = len(taken & boosted)
        self.used += len(taken)
        return chosen

    def count(self) -> int:
        return sum(len(p) for p in self.spares.values())

    def kill(self) -> None:
        for pool in self.spares.values():
            self._kill(pool)
        self.spares = {}

    @staticmethod
    def _kill(pool: list) -> None:
        for w, _ in pool:
            try:
                ray.kill(w)
            except Exception:
                pass
