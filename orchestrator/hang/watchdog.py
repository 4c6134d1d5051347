"""The stall watchdog. Evidence names a culprit early: a rank whose process the kernel shows
stopped (state T, twice, 0.5 s apart: SIGSTOP or job control), as soon as its heartbeat is late; a
rank whose heartbeats stopped, once the group has made no progress for 3 heartbeats; a rank missing
a collective every other rank waits in, once they have waited hang.evidence_factor median step
times. Without such evidence, the fixed threshold is the last resort: no rank has made progress (a
step or an eval batch) for max(hang.timeout_s, k x the median step time), or
hang.first_step_timeout_s before a group's first step. It decides and writes the report; the
controller acts on it.

Looks at processes (procstate.py) go to ranks whose heartbeat is late while another rank's is
fresh, and to every rank once the group has stalled for 3 heartbeats (to a script's own process
then: its worker beats for it, so a stopped script is found there); what they found (a stuck 'D'
thread and its kernel function, a process gone) goes into the report, whoever is named."""

from __future__ import annotations

import time
from collections.abc import Callable

from orchestrator.hang.rules import (
    attribute,
    attribute_stopped,
    beat_pid,
    late_after_s,
    process_note,
    stale_after_s,
    stall_threshold_s,
    stopped_for,
)

MIN_EVIDENCE_S = 8.0  # waiters wait at least this long before a computing rank is named (busy hosts are slow)
FAST_LOOK_S = 0.25  # how soon the controller looks again while a late rank's process is being read
CONFIRM_S = 0.5  # two looks at a stopped process at least this far apart (procstate.CONFIRM_S)
MAX_PROBED = 8  # processes read at once: a frozen rank is one rank or one node's; many late ranks mean a slow control plane
KEEP_LOOKS = 6  # per rank


class Watchdog:
    def __init__(self, *, timeout_s: float, first_step_timeout_s: float, step_time_factor: float,
                 heartbeat_s: float, evidence_factor: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, probe=None):
        """probe: reads ranks' process states on their nodes (procstate.RayProbe; None: no looks)."""
        self.timeout_s, self.first_step_timeout_s = timeout_s, first_step_timeout_s
        self.step_time_factor, self.heartbeat_s, self.evidence_factor = step_time_factor, heartbeat_s, evidence_factor
        self.clock, self.wall, self.probe = clock, wall, probe
        self.reset()

    @classmethod
    def from_config(cls, hang, *, probe=None, reader=None, **clocks) -> Watchdog:
        """reader: procstate.RayProbe's, a read by a process of ours already on the node."""
        if probe is None:
            from orchestrator.hang.procstate import RayProbe

            probe = RayProbe(reader=reader)
        return cls(timeout_s=hang.timeout_s, first_step_timeout_s=hang.first_step_timeout_s,
                   step_time_factor=hang.step_time_factor, heartbeat_s=hang.heartbeat_s,
                   evidence_factor=hang.evidence_factor, probe=probe, **clocks)

    def reset(self) -> None:
        """A new group: its clock starts now; what was seen of the old group's processes is dropped."""
        self.advanced_at = self.clock()
        self.seen_progress = 0
        self.looks: dict[int, list[dict]] = {}  # rank -> the latest looks at its process
        self.asked: dict[int, float] = {}  # rank -> when its process was last asked for (clock)
        self.late: list[int] = []  # ranks being looked at because their heartbeat is late
        self.due: float | None = None  # wall time the next fresh rank would turn late
        if self.probe is not None:
            self.probe.reset()

    def next_look_s(self, normal_s: float) -> float:
        """How long the controller may wait before its next look: fast while a late rank's
        process is being read, else until the next rank would turn late, at most `normal_s`."""
        if self.probe is None:
            return normal_s
        if self.late or self.probe.busy():
            return FAST_LOOK_S
        if self.due is None:
            return normal_s
        return min(normal_s, max(FAST_LOOK_S, self.due - self.wall() + 0.05))

    def check(self, beats: dict[int, dict], *, median_step_s: float | None, world: int,
              nodes: list[str], finished: frozenset[int] = frozenset()) -> dict | None:
        """The stall report, or None while the group is making progress and no evidence names a rank.
        finished: ranks whose training call has returned. They beat no more, by design: at a run's
        end one rank may be done while another still commits the final checkpoint."""
        beats = {r: b for r, b in beats.items() if r not in finished}
        now, wall = self.clock(), self.wall()
        step = max((b["step"] for b in beats.values()), default=-1)
        moved = max((b.get("progress", 0) for b in beats.values()), default=0)  # steps and eval batches
        progressed = moved > self.seen_progress
        if progressed:
            self.seen_progress, self.advanced_at = moved, now
        stalled = now - self.advanced_at
        self._look(beats, nodes, wall, stalled)
        frozen = self._frozen(beats, wall - stalled) if self.evidence_factor else {}
        if progressed and not frozen:
            return None
        limit = stall_threshold_s(self.timeout_s, [median_step_s] if median_step_s else [], self.step_time_factor)
        if step < 0:  # no step done yet in this group: start-up, a restore and the first batch take longer
            limit = max(limit, self.first_step_timeout_s)
        if frozen:  # the kernel's word: no need to wait for the heartbeats to go stale
            early = attribute_stopped(beats, frozen, now=wall, nodes=dict(enumerate(nodes)))
        else:
            early = self._evidence(beats, stalled, median_step_s, step, world, nodes, wall)
        if early is None and stalled < limit:
            return None
        if early is not None:
            report = early
        else:
            beats = dict(beats)
            for r in set(range(world)) - finished:  # a rank that never reported counts as stopped since the start
                beats.setdefault(r, {"rank": r, "step": -1, "phase": "start", "progress": 0, "coll_entered": 0,
                                     "coll_completed": 0, "time": wall - stalled})
            report = attribute(beats, now=wall, heartbeat_s=self.heartbeat_s, nodes=dict(enumerate(nodes)))
        self._add_looks(report, wall)
        report.update(stalled_s=round(stalled, 1), threshold_s=round(limit, 1), step=step,
                      early=early is not None)
        who = (f"rank {', '.join(map(str, report['culprits']))} on node {', '.join(report['culprit_nodes'])}"
               if report["culprits"] else "no single rank")
        report["message"] = (f"stall: no step completed for {report['stalled_s']}s after step {step}; "
                             f"{who}: {report['reason']}")
        return report

    # --- looks at the ranks' processes ----------------------------------------------------

    def _look(self, beats: dict[int, dict], nodes: list[str], wall: float, stalled: float) -> None:
        """Gather the answers, then ask for the processes worth a look: ranks whose heartbeat is
        late while another rank's is fresh (the oldest first), or every rank once the group has
        stalled for 3 heartbeats (so a stall report can say what the kernel saw)."""
        if self.probe is None:
            return
        for rank, found in self.probe.answers().items():
            self.looks[rank] = (self.looks.get(rank, []) + found)[-KEEP_LOOKS:]
        late_after = late_after_s(self.heartbeat_s)
        known = {r: (nodes[r], beat_pid(b)) for r, b in beats.items()
                 if beat_pid(b) is not None and 0 <= r < len(nodes) and nodes[r]}
        age = {r: wall - beats[r]["time"] for r in known}
        fresh = [r for r, a in age.items() if a <= late_after]
        self.late = sorted((r for r, a in age.items() if a > late_after), key=lambda r: -age[r]) if fresh else []
        self.due = min((beats[r]["time"] + late_after for r in fresh), default=None)
        wanted, everyone = self.late, False
        if not wanted and stalled >= stale_after_s(self.heartbeat_s) and self.seen_progress:
            wanted, everyone = sorted(known), True
        now = self.clock()
        by_node: dict[str, dict[int, int]] = {}
        for r in wanted[:MAX_PROBED]:
            if now - self.asked.get(r, -1e9) >= self.heartbeat_s:  # one look a heartbeat per rank
                node, pid = known[r]
                # a stalled group: the process that computes (a script's own, whose worker may still beat)
                by_node.setdefault(node, {})[r] = beats[r].get("pid", pid) if everyone else pid
        for node, pids in by_node.items():
            self.probe.request(node, pids)
            self.asked.update(dict.fromkeys(pids, now))

    def _frozen(self, beats: dict[int, dict], stalled_since: float) -> dict[int, dict]:
        """rank -> its last look, for the ranks whose processes are proven stopped: since their last
        beat, or, for a script whose worker still beats for it, since the group last made progress."""
        proven = {r: stopped_for(self.looks.get(r, []), beats[r]["time"], span_s=CONFIRM_S) for r in self.late}
        for r, b in beats.items():
            if r not in proven and beat_pid(b) != b.get("pid"):  # a script: its worker beats for it
                own = [s for s in self.looks.get(r, []) if s["pid"] == b["pid"]]
                proven[r] = stopped_for(own, stalled_since, span_s=CONFIRM_S)
        return {r: s for r, s in proven.items() if s is not None}

    def _add_looks(self, report: dict, wall: float) -> None:
        """Each rank's latest look at its process, if taken during this stall or since its last
        beat; what a culprit's says (stopped, stuck in the kernel, gone) is added to the reason."""
        notes = []
        for r, info in report["ranks"].items():
            last = self.looks.get(r, [])[-1:]
            if not last or last[0]["at"] < min(info["time"], wall - stale_after_s(self.heartbeat_s)):
                continue
            info["process"] = last[0]
            note = process_note(last[0])
            if note and r in report["culprits"] and note not in report["reason"]:
                notes.append(f"rank {r}: {note}")
        if notes:
            report["reason"] += "; " + "; ".join(notes)

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

