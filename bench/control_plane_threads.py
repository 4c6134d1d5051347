"""The old simulator of bench/control_plane.py (`--sim threads`), kept for the before/after comparison.

Each simulated rank runs the real rank-side classes on threads of its own: the heartbeat thread
(orchestrator/hang/health.py's Heartbeat), the metric sender's flusher thread
(actors/metric_sender.py) and a thread per checkpoint write through checkpointing/writer.py's
FileWriter, the write itself a sleep. At 1,024 ranks that is 2,048+ threads on this 2-core
machine: they fell up to 21 s behind their own schedule, so the bench measured them, not the
control plane (bench/control_plane_sim.py is the light simulator that replaced them).
"""

from __future__ import annotations

import os
import random
import threading
import time

from control_plane_sim import step_values


class SlowFS:
    """The shard write, simulated: a sleep; each write's start and end are kept (slots in flight)."""

    protocol = "bench"

    def __init__(self, write_s: float):
        self.write_s = write_s
        self.writes: list[tuple[float, float]] = []
        self.sizes: dict[str, int] = {}

    def pipe_file(self, path: str, data: bytes, **kw) -> None:
        t0 = time.time()
        time.sleep(self.write_s)
        self.sizes[path] = len(data)
        self.writes.append((t0, time.time()))

    def invalidate_cache(self, path: str) -> None:
        pass

    def size(self, path: str) -> int:
        return self.sizes[path]


class TimedClient:
    """A rank's coordinator client, timing each write's first slot request to its grant."""

    def __init__(self, client):
        self.client = client
        self.asked: float | None = None
        self.grants: list[float] = []

    def call(self, method: str, *args, **kwargs):
        if method == "acquire" and self.asked is None:
            self.asked = time.time()
        out = self.client.call(method, *args, **kwargs)
        if method == "acquire" and out is not None:
            self.grants.append(time.time() - self.asked)
            self.asked = None
        return out


class CountingMonitor:
    """The health monitor's handle as the heartbeat threads see it, counting the beats they send
    (do the simulated ranks keep their pace on this machine, or is the simulation starved?)."""

    def __init__(self, monitor):
        self.monitor, self.sent = monitor, 0

    @property
    def beat(self):
        self.sent += 1
        return self.monitor.beat

    @property
    def put_dump(self):
        return self.monitor.put_dump


class RankHost:
    """Many simulated ranks in one process: their heartbeat and sender threads are the real ones;
    one thread plays every rank's training loop (a step each step_s, 50 keys logged per step)."""

    def __init__(self, ranks: list[int], node: str, plan: dict, *, monitor, metrics, coordinator):
        from actors.metric_sender import MetricSender
        from checkpointing.client import RayClient
        from checkpointing.config import CheckpointConfig
        from checkpointing.writer import FileWriter
        from orchestrator.hang.health import Health, Heartbeat

        self.ranks, self.node, self.plan = ranks, node, plan
        self.fs = SlowFS(plan["write_s"])
        cfg = CheckpointConfig()
        self.health = {r: Health(r) for r in ranks}
        self.monitor = CountingMonitor(monitor)
        self.beats = {r: Heartbeat(self.monitor, self.health[r], plan["heartbeat_s"]).start() for r in ranks}
        self.senders = {r: MetricSender(metrics, r, flush_every_s=plan["flush_every_s"]) for r in ranks}
        self.clients = {r: TimedClient(RayClient(coordinator)) for r in ranks}
        self.writers = {r: FileWriter(self.fs, self.clients[r], rank=r, node=node, cfg=cfg) for r in ranks}
        self.logged = 0
        self.write_errors: list[str] = []
        self.active: dict[int, threading.Thread] = {}  # each rank's write in progress
        self.skipped = 0
        self.stop_event = threading.Event()

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.stop_event.set()

    def _freeze(self, rank: int) -> None:
        """SIGSTOP, as the monitor and the metrics actor see it: its side threads stop."""
        self.beats[rank]._stop.set()
        sender = self.senders[rank]
        sender._stop.set()
        sender._wake.set()

    def _write(self, rank: int, step: int, threads: list) -> None:
        if self.active.get(rank) is not None and self.active[rank].is_alive():
            self.skipped += 1  # its last checkpoint is still being written: a rank saves one at a time
            return

        def go():
            try:
                self.writers[rank].write(f"ckpt/step{step}/rank{rank}.pt", b"x" * 1024)
            except Exception as e:  # a write that never got a slot: counted, and the bench says so
                self.write_errors.append(f"rank {rank}: {type(e).__name__}: {e}")

        t = self.active[rank] = threading.Thread(target=go, name=f"write-{rank}", daemon=True)
        t.start()
        threads.append(t)

    def run(self, schedule: dict) -> dict:
        """schedule: t0 (the first step) and freeze_at, wall clock."""
        self.plan.update(schedule)
        plan, frozen = self.plan, self.plan["frozen_rank"]
        timer = None
        if frozen in self.health:
            timer = threading.Timer(max(0.0, plan["freeze_at"] - time.time()), self._freeze, (frozen,))
            timer.start()
        writes: list[threading.Thread] = []
        late: list[float] = []  # how far behind its schedule this host's training loop ran
        step = 0
        while not self.stop_event.wait(max(0.0, plan["t0"] + step * plan["step_s"] - time.time())):
            now = time.time()
            if now >= plan["freeze_at"]:
                break
            late.append(now - plan["t0"] - step * plan["step_s"])
            for r in self.ranks:
                h = self.health[r]
                h.step, h.progress, h.phase = step, step + 1, "forward"
                h.coll_entered += 1
                h.coll_completed += 1
                values = step_values(step, now, plan["step_s"], random)  # the module: its own draws
                self.senders[r].log(values, step=step)
                self.logged += len(values)
            if step and step % plan["ckpt_every"] == 0:
                for r in self.ranks:
                    self._write(r, step, writes)
            step += 1
        for r in self.ranks:  # the others wait in the collective the frozen rank never joins
            h = self.health[r]
            h.phase = "backward"
            h.coll_entered += 1
        beats_at, beats0 = time.time(), self.monitor.sent
        self.stop_event.wait()
        beat_rate = (self.monitor.sent - beats0) / max(1e-9, time.time() - beats_at) / len(self.ranks)
        if timer is not None:
            timer.cancel()
        deadline = time.time() + 120  # one bound for all of them
        for t in writes:
            t.join(timeout=max(0.0, deadline - time.time()))
        stuck = sum(t.is_alive() for t in writes)
        for b in self.beats.values():
            b.stop()
        unsent = []
        for s in self.senders.values():  # delivers what is left (the frozen one: as if sent SIGCONT)
            try:
                s.close()
            except RuntimeError as e:
                unsent.append(str(e))
        return {"logged": self.logged, "late": late, "beat_rate": beat_rate, "acked": sum(s.sent_points for s in self.senders.values()),
                "dropped": sum(s.dropped_points for s in self.senders.values()), "unsent": unsent,
                "grants": [g for c in self.clients.values() for g in c.grants], "writes": self.fs.writes,
                "write_errors": self.write_errors[:5], "n_write_errors": len(self.write_errors), "stuck": stuck,
                "skipped": self.skipped}
