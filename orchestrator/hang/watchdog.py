"""The stall watchdog. Evidence names a culprit early: a rank whose heartbeats stopped, once the
group has made no progress for 3 heartbeats; a rank missing a collective every other rank waits
in, once they have waited hang.evidence_factor median step times. Without such evidence, the
fixed threshold is the last resort: no rank has made progress (a step or an eval batch) for
max(hang.timeout_s, k x the median step time), or hang.first_step_timeout_s before a group's
first step. It decides and writes the report; the controller acts on it."""

from __future__ import annotations

import time
from collections.abc import Callable

from orchestrator.hang.rules import attribute, stale_after_s, stall_threshold_s

MIN_EVIDENCE_S = 8.0  # waiters wait at least this long before a computing rank is named (busy hosts are slow)


class Watchdog:
    def __init__(self, *, timeout_s: float, first_step_timeout_s: float, step_time_factor: float,
                 heartbeat_s: float, evidence_factor: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.timeout_s, self.first_step_timeout_s = timeout_s, first_step_timeout_s
        self.step_time_factor, self.heartbeat_s, self.evidence_factor = step_time_factor, heartbeat_s, evidence_factor
        self.clock, self.wall = clock, wall
        self.reset()

    @classmethod
    def from_config(cls, hang, **clocks) -> Watchdog:
        return cls(timeout_s=hang.timeout_s, first_step_timeout_s=hang.first_step_timeout_s,
                   step_time_factor=hang.step_time_factor, heartbeat_s=hang.heartbeat_s,
                   evidence_factor=hang.evidence_factor, **clocks)

    def reset(self) -> None:
        """A new group: its clock starts now."""
        self.advanced_at = self.clock()
        self.seen_progress = 0

    def check(self, beats: dict[int, dict], *, median_step_s: float | None, world: int,
              nodes: list[str]) -> dict | None:
        """The stall report, or None while the group is making progress and no evidence names a rank."""
        now = self.clock()
        step = max((b["step"] for b in beats.values()), default=-1)
        moved = max((b.get("progress", 0) for b in beats.values()), default=0)  # steps and eval batches
        if moved > self.seen_progress:
            self.seen_progress, self.advanced_at = moved, now
            return None
        stalled = now - self.advanced_at
        limit = stall_threshold_s(self.timeout_s, [median_step_s] if median_step_s else [], self.step_time_factor)
        if step < 0:  # no step done yet in this group: start-up, a restore and the first batch take longer
            limit = max(limit, self.first_step_timeout_s)
        wall = self.wall()
        early = self._evidence(beats, stalled, median_step_s, step, world, nodes, wall)
        if early is None and stalled < limit:
            return None
        if early is not None:
            report = early
        else:
            beats = dict(beats)
            for r in range(world):  # a rank that never reported counts as stopped since the start
                beats.setdefault(r, {"rank": r, "step": -1, "phase": "start", "progress": 0, "coll_entered": 0,
                                     "coll_completed": 0, "time": wall - stalled})
            report = attribute(beats, now=wall, heartbeat_s=self.heartbeat_s, nodes=dict(enumerate(nodes)))
        report.update(stalled_s=round(stalled, 1), threshold_s=round(limit, 1), step=step,
                      early=early is not None)
        who = (f"rank {', '.join(map(str, report['culprits']))} on node {', '.join(report['culprit_nodes'])}"
               if report["culprits"] else "no single rank")
        report["message"] = (f"stall: no step completed for {report['stalled_s']}s after step {step}; "
                             f"{who}: {report['reason']}")
        return report

    def _evidence(self, beats: dict[int, dict], stalled: float, median_step_s: float | None, step: int,
                  world: int, nodes: list[str], wall: float) -> dict | None:
        """A report naming a culprit before the fixed threshold, when the heartbeats prove one: some
        ranks still beat (so the monitor and the host are fine) while the culprit's beats stopped,
        or the culprit computes (forward, backward, optimizer) while every other rank waits for it.
        Slow data reads, checkpoints and evals are left to the fixed threshold: they are not hangs."""
        if not self.evidence_factor or step < 0 or len(beats) < world:
            return None  # start-up is judged by the fixed threshold alone; so is a rank never heard from
        stale = stale_after_s(self.heartbeat_s)
        if stalled < stale:
            return None
        report = attribute(beats, now=wall, heartbeat_s=self.heartbeat_s, nodes=dict(enumerate(nodes)))
        fresh = [r for r, b in report["ranks"].items() if b["age_s"] <= stale]
        if report["verdict"] == "stopped" and fresh:
            return report
        wait = max(self.evidence_factor * (median_step_s or 0), MIN_EVIDENCE_S)
        computing = all(report["ranks"][r]["phase"] in ("forward", "backward", "optimizer", "train")
                        for r in report["culprits"])
        if report["verdict"] == "missing_collective" and computing and stalled >= wait:
            return report
        return None
