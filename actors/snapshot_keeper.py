"""One per node of a run: holds in-memory snapshots (checkpointing/memory.py) of its own node's
ranks and of the previous node's.

A Ray object dies with the worker that owns it, so a snapshot must not stay an object of the
rank that took it: the rank sends its parts (a header's bytes and a buffer: checkpointing/flat.py),
and this actor, pinned to its node, keeps its own copy of them. It lives as long as the run (or
its node). Per rank it keeps the two newest snapshots: a newer one is still arriving when a
failure may strike, and the older one must then still be whole.

Before a rank sends, it asks for room (`reserve`): refused when the node would be left with less
free memory than `headroom_bytes`, so a replica never gets this node OOM-killed.
"""

from __future__ import annotations

from collections.abc import Callable

KEEP = 2  # snapshots kept per rank
Parts = tuple[bytes, ...]


def size(parts) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def node_free_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def default_headroom() -> int:
    """Free memory a node keeps after taking a replica: 5% of it, at least 512 MiB."""
    import psutil

    return max(512 * 2**20, psutil.virtual_memory().total // 20)


class SnapshotKeeper:
    def __init__(self, node_id: str, *, attempt: int = 0, free_bytes: Callable[[], int] = node_free_bytes,
                 headroom_bytes: int | None = None):
        """attempt: the one running when it starts (sends of older ones are refused, as after begin())."""
        self.node_id = node_id
        self.free_bytes = free_bytes
        self.headroom = default_headroom() if headroom_bytes is None else headroom_bytes
        self.held: dict[int, dict[int, tuple[int, int, Parts]]] = {}  # rank -> step -> (world, attempt, parts)
        self.reserved: dict[tuple[int, int], int] = {}  # (rank, step) -> bytes promised, not yet arrived
        self.attempt = attempt

    def begin(self, attempt: int, keep_through: int | None) -> int:
        """A new group starts from step `keep_through` (None: from scratch). Snapshots of later
        steps belong to a future it replays (possibly differently: skipped batches, corruption):
        dropped. Sends of older attempts are refused from now on. Returns how many were dropped."""
        self.attempt = max(self.attempt, attempt)
        self.reserved.clear()
        dropped = 0
        for snaps in self.held.values():
            for step in [s for s in snaps if keep_through is None or s > keep_through]:
                del snaps[step]
                dropped += 1
        return dropped

    def reserve(self, rank: int, step: int, nbytes: int, attempt: int) -> str | None:
        """Room for a snapshot of `nbytes`: None if granted, else why not. On a grant the
        rank's oldest snapshots are let go so that, with this one, KEEP remain."""
        if attempt < self.attempt:
            return f"attempt {attempt} is over (attempt {self.attempt} runs)"
        snaps = self.held.get(rank, {})
        older = sorted(s for s in snaps if s < step)[: max(0, len(snaps) - (KEEP - 1))]
        freed = sum(size(snaps[s][2]) for s in older)
        free = self.free_bytes() + freed - sum(self.reserved.values())
        if free - nbytes < self.headroom:
            return (f"node {self.node_id[:12]} has {free / 2**20:.1f} MB free; the replica needs "
                    f"{nbytes / 2**20:.1f} MB and {self.headroom / 2**20:.0f} MB must stay free")
        for s in older:
            del snaps[s]
        self.reserved[(rank, step)] = nbytes
        return None

    def put(self, rank: int, step: int, world_size: int, attempt: int, parts: list) -> str | None:
        """Keep a snapshot's parts (bytes-like: a numpy array arrives as read-only shared memory,
        which dies with the rank that sent it, hence the copy)."""
        if attempt < self.attempt:
            return f"attempt {attempt} is over (attempt {self.attempt} runs)"
        if self.reserved.pop((rank, step), None) != size(parts):
            return f"no room was reserved for {size(parts)} bytes of rank {rank}'s step {step}"
        self.held.setdefault(rank, {})[step] = (world_size, attempt, tuple(bytes(p) for p in parts))
        return None

    def inventory(self) -> list[dict]:
        return [{"rank": r, "step": s, "world_size": w, "attempt": a, "bytes": size(d)}
                for r, snaps in sorted(self.held.items()) for s, (w, a, d) in sorted(snaps.items())]

    def get(self, rank: int, step: int) -> list:
        """The parts as numpy views of what is kept: Ray sends an array out of band, bytes it would pickle."""
        import numpy as np

        held = self.held.get(rank, {}).get(step)
        if held is None:
            raise KeyError(f"no snapshot of rank {rank} at step {step} on node {self.node_id[:12]}")
        return [np.frombuffer(p, dtype=np.uint8) for p in held[2]]

    def held_bytes(self) -> int:
        return sum(size(d) for snaps in self.held.values() for _, _, d in snaps.values())


class Keepers:
    """The run's keepers, one per node a group has used (every Ray call about them)."""

    def __init__(self, prefix: str):
        self.prefix = prefix  # "<run name>:<run id>"
        self.by_node: dict[str, object] = {}
        self.born: dict[str, int] = {}  # node -> the attempt its keeper was started in (none: found by name)
        self.said_alone = False

    def ensure(self, nodes: list[str], attempt: int) -> None:
        """A keeper on each of `nodes`: the one it has, one found by name (a node back after a
        partition: it may hold snapshots), or a new one, started at `attempt`. Not waited for: a
        process starts in about a second, and the restore reads only keepers that hold something."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for node in nodes:
            if node in self.by_node:
                continue
            name = f"{self.prefix}:snapshots:{node[:12]}"
            try:
                self.by_node[node] = ray.get_actor(name)
                self.born.pop(node, None)
            except ValueError:  # none by that name
                self.by_node[node] = ray.remote(SnapshotKeeper).options(
                    name=name, num_cpus=0, get_if_exists=True,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(node, attempt=attempt)
                self.born[node] = attempt

    @staticmethod
    def targets(nodes: list[str]) -> dict[str, tuple[str, ...]]:
        """Where each node's ranks send their snapshots: its own keeper (a killed rank's snapshot
        outlives it there) and the next node's in a ring (for the loss of its own node). With one
        keeper per rank, losing node i would also take node i-1's ranks' snapshots, and a group
        restores only when every rank has one. One node: its own keeper only."""
        order = list(dict.fromkeys(nodes))
        return {n: tuple(dict.fromkeys((n, order[(i + 1) % len(order)]))) for i, n in enumerate(order)}

    def begin(self, attempt: int, keep_through: int | None, timeout_s: float = 30.0) -> None:
        """Every keeper that holds something starts `attempt` (SnapshotKeeper.begin). One started in
        this attempt holds nothing and refuses older sends already: not waited for (after a rank
        moved to a node new to the run, waiting for its new keeper held the ranks back ~1.2 s)."""
        self._each("begin", (attempt, keep_through), timeout_s, skip={n for n, a in self.born.items() if a == attempt})

    def inventory(self, timeout_s: float = 30.0, unreachable: tuple[str, ...] = ()) -> dict[str, list[dict]]:
        """node -> its snapshots, from the keepers still alive. The keepers on `unreachable` nodes
        (Ray lost its connection to a process there and has not declared the node dead yet) are
        not asked: every call to an actor there takes Ray about 2 s to fail, measured, and what
        they hold could not be fetched. They are forgotten, not killed: should the node come back
        (a partition healed), ensure() finds its keeper again by name."""
        for node in unreachable:
            self.by_node.pop(node, None)
        return self._each("inventory", (), timeout_s)

    def _each(self, method: str, args: tuple, timeout_s: float, skip: set[str] = frozenset()) -> dict:
        import ray

        refs = {node: getattr(k, method).remote(*args) for node, k in self.by_node.items() if node not in skip}
        out = {}
        for node, ref in refs.items():
            try:
                out[node] = ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.by_node.pop(node, None)  # its node is gone: so are the snapshots it held
        return out

    def kill(self) -> None:
        import ray

        for k in self.by_node.values():
            try:
                ray.kill(k)
            except Exception:
                pass
        self.by_node.clear()
        self.born.clear()
