"""The stall watchdog: no rank has made progress (a step or an eval batch) for
max(hang.timeout_s, k x the median step time), or hang.first_step_timeout_s before a group's
first step. It decides and writes the report; the controller acts on it."""

from __future__ import annotations

import time
from collections.abc import Callable

from orchestrator.hang.rules import attribute, stall_threshold_s


class Watchdog:
    def __init__(self, *, timeout_s: float, first_step_timeout_s: float, step_time_factor: float,
                 heartbeat_s: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.timeout_s, self.first_step_timeout_s = timeout_s, first_step_timeout_s
        self.step_time_factor, self.heartbeat_s = step_time_factor, heartbeat_s
        self.clock, self.wall = clock, wall
        self.reset()

    @classmethod
    def from_config(cls, hang, **clocks) -> Watchdog:
        return cls(timeout_s=hang.timeout_s, first_step_timeout_s=hang.first_step_timeout_s,
                   step_time_factor=hang.step_time_factor, heartbeat_s=hang.heartbeat_s, **clocks)

    def reset(self) -> None:
        """A new group: its clock starts now."""
        self.advanced_at = self.clock()
        self.seen_progress = 0

    def check(self, beats: dict[int, dict], *, median_step_s: float | None, world: int,
              nodes: list[str]) -> dict | None:
        """The stall report, or None while the group is making progress or within its threshold."""
        now = self.clock()
        step = max((b["step"] for b in beats.values()), default=-1)
        moved = max((b.get("progress", 0) for b in beats.values()), default=0)  # steps and eval batches
        if moved > self.seen_progress:
            self.seen_progress, self.advanced_at = moved, now
            return None
        limit = stall_threshold_s(self.timeout_s, [median_step_s] if median_step_s else [], self.step_time_factor)
        if step < 0:  # no step done yet in this group: start-up, a restore and the first batch take longer
            limit = max(limit, self.first_step_timeout_s)
        if now - self.advanced_at < limit:
            return None
        wall = self.wall()
        beats = dict(beats)
        for r in range(world):  # a rank that never reported counts as stopped since the start
            beats.setdefault(r, {"rank": r, "step": -1, "phase": "start", "progress": 0, "coll_entered": 0,
                                 "coll_completed": 0, "time": wall - (now - self.advanced_at)})
        report = attribute(beats, now=wall, heartbeat_s=self.heartbeat_s, nodes=dict(enumerate(nodes)))
        report.update(stalled_s=round(now - self.advanced_at, 1), threshold_s=round(limit, 1), step=step)
        who = (f"rank {', '.join(map(str, report['culprits']))} on node {', '.join(report['culprit_nodes'])}"
               if report["culprits"] else "no single rank")
        report["message"] = (f"stall: no step completed for {report['stalled_s']}s after step {step}; "
                             f"{who}: {report['reason']}")
        return report
