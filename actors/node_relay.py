"""One per node of a worker group: the node's ranks hand it their heartbeats and metric batches,
and it forwards them at most twice a tick, in HealthMonitor.beat_many and
MetricsActor.log_columns_many calls for the whole node instead of one call per rank (a tree, not
a star: at 1,024 ranks the per-rank calls cost the monitor a quarter of a core, bench/control_plane.py).

It forwards what the ranks sent and nothing of its own: a heartbeat keeps the rank's clock time
and counters, so a frozen rank looks exactly as stale as without the relay; a batch keeps the
rank's seq, so one the rank sends again directly (after a relay timeout) is stored once.

It holds nothing a rank cannot send again: a rank keeps a batch until the metrics actor's answer
comes back through the relay, and beats afresh every tick. So a dead or stuck relay costs the
ranks a fallback to direct calls, not data (the rank side: actors/metric_sender.py,
orchestrator/hang/health.py).
"""

from __future__ import annotations

import asyncio
import time

# telemetry.relay=auto: a group this large gets relays. Below it the star costs the run's actors little
# (bench/control_plane.py, per-rank calls: at 64 ranks the monitor took 2.5 CPU s a minute and ingest lag
# p99 was 1.2 s, the same as per node; from 256 the per-rank calls showed, docs/SCALE.md)
RELAY_FROM_RANKS = 256
STUCK_TICKS = 3  # beats waiting this many ticks to be forwarded: the relay tells its ranks to beat directly too
# a forward starts at most every half tick: a heartbeat or a batch waits in the relay at most half a tick
# (a heartbeat's age is judged against the tick), for 2 calls a tick per node instead of one per rank
FORWARD_EVERY_TICKS = 0.5


def relay_nodes(mode: str, nodes: list[str]) -> list[str]:
    """The nodes that get a relay, given each rank's node: "on": every node; "off": none; "auto":
    nodes with more than one rank, in a group of RELAY_FROM_RANKS ranks or more."""
    if mode == "off" or (mode == "auto" and len(nodes) < RELAY_FROM_RANKS):
        return []
    order = list(dict.fromkeys(nodes))
    return order if mode == "on" else [n for n in order if nodes.count(n) > 1]


class NodeRelay:
    """An async actor (one event loop): the ranks' calls are answered from memory; the forwards run
    as one task per kind, each starting at most every FORWARD_EVERY_TICKS ticks."""

    def __init__(self, node_id: str, *, monitor, metrics, heartbeat_s: float, flush_every_s: float,
                 call_timeout_s: float = 60.0):
        self.node_id = node_id
        self.monitor, self.metrics = monitor, metrics
        self.heartbeat_s, self.flush_every_s, self.call_timeout_s = heartbeat_s, flush_every_s, call_timeout_s
        self.beats: dict[int, dict] = {}  # rank -> its latest heartbeat not yet forwarded
        self.beats_since: float | None = None  # when the oldest of them arrived (monotonic)
        self.batches: list[tuple[tuple, asyncio.Future]] = []  # (rank, seq, columns, dropped), its answer
        self.request: int | None = None  # the monitor's dump-request number, from its latest answer
        self.tasks: dict[str, asyncio.Task | None] = {"beats": None, "metrics": None}
        self.last_start = {"beats": -1e9, "metrics": -1e9}
        self.stats = dict.fromkeys(["beats_in", "beat_calls", "beat_errors", "batches_in", "metric_calls",
                                    "metric_errors"], 0)

    # --- the ranks' calls -------------------------------------------------------------------

    async def beat(self, snapshot: dict) -> dict:
        """A rank's heartbeat. Answers the monitor's latest dump request and whether the relay's own
        forwards keep up ("ok" False: beats waited STUCK_TICKS ticks; the rank then beats directly too)."""
        old = self.beats.get(snapshot["rank"])
        if old is None or snapshot["time"] >= old["time"]:
            self.beats[snapshot["rank"]] = snapshot
        if self.beats_since is None:
            self.beats_since = time.monotonic()
        self.stats["beats_in"] += 1
        self._kick("beats")
        stuck = time.monotonic() - self.beats_since > STUCK_TICKS * self.heartbeat_s
        return {"request": self.request, "ok": not stuck}

    async def log_columns(self, rank: int, seq: int | None, columns: dict, dropped: int = 0) -> int:
        """A rank's metric batch, as MetricsActor.log_columns_grouped takes it; answers once the
        metrics actor has stored it (the points stored; 0: already stored), or raises its error."""
        done = asyncio.get_running_loop().create_future()
        self.batches.append(((rank, seq, columns, dropped), done))
        self.stats["batches_in"] += 1
        self._kick("metrics")
        return await done

    async def counts(self) -> dict:
        """Calls in from the ranks and out to the run's actors (tests and the bench read them)."""
        return {"node": self.node_id, **self.stats}

    # --- forwarding ---------------------------------------------------------------------------

    def _kick(self, kind: str) -> None:
        if self.tasks[kind] is None:
            self.tasks[kind] = asyncio.ensure_future(self._forward(kind))

    async def _forward(self, kind: str) -> None:
        """While something waits: wait out the rest of the gap since the last forward began, then
        send everything that arrived meanwhile in one call. A first item after a quiet spell goes at once."""
        every = FORWARD_EVERY_TICKS * (self.heartbeat_s if kind == "beats" else self.flush_every_s)
        try:
            while self.beats if kind == "beats" else self.batches:
                wait = self.last_start[kind] + every - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.last_start[kind] = time.monotonic()
                await (self._send_beats() if kind == "beats" else self._send_batches())
        finally:
            self.tasks[kind] = None

    async def _call(self, ref):
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.call_timeout_s)

    async def _send_beats(self) -> None:
        snaps, self.beats, self.beats_since = list(self.beats.values()), {}, None
        try:
            self.request = await self._call(self.monitor.beat_many.remote(snaps))
            self.stats["beat_calls"] += 1
        except Exception:  # the monitor is gone or stuck: the ranks beat again next tick (directly, if this lasts)
            self.stats["beat_errors"] += 1

    async def _send_batches(self) -> None:
        group, self.batches = self.batches, []
        group = [(batch, done) for batch, done in group if not done.done()]  # a rank that gave up has cancelled
        if not group:
            return
        try:
            results = await self._call(self.metrics.log_columns_many.remote([batch for batch, _ in group]))
            self.stats["metric_calls"] += 1
        except Exception as e:  # every rank of the group sends again; those stored are skipped by their seq
            self.stats["metric_errors"] += 1
            results = [e] * len(group)
        for (_, done), result in zip(group, results, strict=True):
            if done.done():
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)


class Relays:
    """A group's relays, one per node that gets one (every Ray call about them)."""

    def __init__(self, prefix: str):
        self.prefix = prefix  # "<run name>:<run id>"
        self.by_node: dict[str, object] = {}

    def start(self, nodes: list[str], *, attempt: int, monitor, metrics, heartbeat_s: float,
              flush_every_s: float) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        suffix = f":a{attempt}" if attempt else ""
        for node in dict.fromkeys(nodes):
            self.by_node[node] = ray.remote(NodeRelay).options(
                name=f"{self.prefix}:relay:{node[:12]}{suffix}", num_cpus=0, max_concurrency=10_000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(node, monitor=monitor, metrics=metrics, heartbeat_s=heartbeat_s, flush_every_s=flush_every_s)

    def of(self, node: str):
        return self.by_node.get(node)

    def kill(self) -> None:
        import ray

        for relay in self.by_node.values():
            try:
                ray.kill(relay)
            except Exception:
                pass
        self.by_node.clear()
