"""Heartbeats: each rank's training thread updates a few counters (collectives are counted per
step around backward, where DDP's all-reduces run and are waited for); a thread of its own sends
them to the run's health monitor every `hang.heartbeat_s`, so a rank stuck in a collective,
a data read or a frozen process still shows what it was doing."""

from __future__ import annotations

import threading
import time


class Health:
    """What a rank is doing; written by the training thread (plain attribute stores, no locks)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.step = -1  # last completed step
        self.phase = "start"
        self.coll_entered = 0
        self.coll_completed = 0
        self.step_started = time.time()

    def snapshot(self) -> dict:
        return {"rank": self.rank, "step": self.step, "phase": self.phase, "coll_entered": self.coll_entered,
                "coll_completed": self.coll_completed, "time": time.time()}


class HealthMonitor:
    """One per run (no CPU): the latest heartbeat of every rank."""

    def __init__(self):
        self.beats: dict[int, dict] = {}

    def beat(self, snapshot: dict) -> None:
        self.beats[snapshot["rank"]] = snapshot

    def snapshot(self) -> dict[int, dict]:
        return dict(self.beats)

    def reset(self) -> None:
        self.beats = {}


class Heartbeat:
    def __init__(self, monitor, health: Health, every_s: float):
        self.monitor, self.health, self.every_s = monitor, health, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.monitor.beat.remote(self.health.snapshot())  # fire and forget
            except Exception:  # the monitor is gone: the driver is tearing down
                pass
            if self._stop.wait(self.every_s):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 2)
