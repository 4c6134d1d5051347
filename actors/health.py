"""The run's health monitor: the latest heartbeat of every rank (sent by the ranks' heartbeat
threads, orchestrator/hang/health.py), and torch Flight Recorder dumps on the driver's request."""

from __future__ import annotations


class HealthMonitor:
    """One per run (no CPU): the latest heartbeat of every rank, and Flight Recorder dumps on request."""

    def __init__(self):
        self.beats: dict[int, dict] = {}
        self.request = 0  # bumped by the driver to ask every rank for a dump
        self.dumps: dict[int, str | None] = {}
        self.stacks: dict[int, str | None] = {}
        self.calls = {"beat": 0, "beat_many": 0}

    def beat(self, snapshot: dict) -> int:
        self.calls["beat"] += 1
        self._keep(snapshot)
        return self.request

    def beat_many(self, snapshots: list[dict]) -> int:
        """The heartbeats of a node's ranks in one call, from its relay (actors/node_relay.py): one
        call a tick per node, not per rank (at 1,024 ranks the per-rank calls took a quarter of a
        core here, bench/control_plane.py)."""
        self.calls["beat_many"] += 1
        for snapshot in snapshots:
            self._keep(snapshot)
        return self.request

    def _keep(self, snapshot: dict) -> None:
        """The newer by the rank's own clock: a beat a relay delivers late never hides a newer one
        the rank sent directly (nor makes a rank look fresher than its last own beat)."""
        old = self.beats.get(snapshot["rank"])
        if old is None or snapshot["time"] >= old["time"]:
            self.beats[snapshot["rank"]] = snapshot

    def call_counts(self) -> dict[str, int]:
        """Heartbeat calls received, per method (per-rank beats vs relays' beat_many)."""
        return dict(self.calls)

    def snapshot(self) -> dict[int, dict]:
        return dict(self.beats)

    def request_dumps(self) -> int:
        self.request += 1
        self.dumps, self.stacks = {}, {}
        return self.request

    def put_dump(self, rank: int, request: int, text: str | None, stack: str | None = None) -> None:
        """A rank's Flight Recorder buffer (JSON text) and its Python stacks (py-spy's text)."""
        if request == self.request:
            self.dumps[rank] = text
            self.stacks[rank] = stack

    def take_dumps(self) -> dict[int, str | None]:
        return dict(self.dumps)

    def take_stacks(self) -> dict[int, str | None]:
        return dict(self.stacks)

    def reset(self) -> None:
        self.beats, self.dumps, self.stacks = {}, {}, {}
