"""The light simulator of bench/control_plane.py: many ranks as asyncio tasks in one process per node.

A real rank's side threads make these actor calls, and so do these tasks, on the same schedule:
  heartbeat    HealthMonitor.beat(snapshot) every hang.heartbeat_s, never waiting for the answer
  metrics      MetricsActor.log_columns_grouped(rank, seq, columns, dropped) every
               telemetry.flush_every_s with what was logged since (50 keys a step), waiting for the
               answer before the next flush, as actors/metric_sender.py does (its buffer is used here)
  checkpoint   CheckpointCoordinator.acquire_wait(rank, node, timeout_s) after a jittered start,
               again until granted, the write (a sleep), then release(slot), as checkpointing/
               client.py's RayClient does for checkpointing/writer.py's FileWriter

The tasks fire on a fixed schedule (each rank at its own phase), so a late tick is measured
(`late`), not silently absorbed: the bench can tell a slow control plane from a starved simulator.
The old simulator (a thread per side thread, bench/control_plane_threads.py) spent 2,048 threads
on 1,024 ranks and measured mostly itself on this 2-core machine.

With `aggregate`, the process also plays each node's aggregator: its ranks' heartbeats go out as
one HealthMonitor.beat_many call a heartbeat tick, and their metric batches as one
MetricsActor.log_columns_many call a flush tick (the rank -> aggregator hop is node-local, and its
cost grows with the ranks of one node, not with the run, so it is not simulated).

With `relay`, each node has the product's relay (actors/node_relay.py, one actor per node, as the
worker group starts it): the tasks make the per-rank calls a real rank makes to it (NodeRelay.beat,
NodeRelay.log_columns), and the relay makes the per-node calls. So the rank -> relay hop is measured
too, and the relay -> run actors hop is the product's own code, not this simulator's.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

KEYS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s", "health/compute_s",
        "bench/sent_at"] + [f"sys/k{i:02d}" for i in range(43)]  # 50 keys per step


def step_values(step: int, now: float, step_s: float, rng: random.Random) -> dict[str, float]:
    """One step's 50 values, the built-in loop's train/* among them (the detectors do real work)."""
    values = dict.fromkeys(KEYS, 1.0)
    values.update({"train/loss": 5.0 / (1 + 0.01 * step), "train/lr": 3e-3, "train/grad_norm": 1.0,
                   "train/tokens_per_s": 1e4, "train/step_time_s": step_s,
                   "health/compute_s": 0.5 * step_s * (1 + 0.01 * rng.random()), "bench/sent_at": now})
    return values


async def wait_ref(ref, timeout_s: float):
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)


class AsyncRankHost:
    """The ranks of one node; a Ray async actor (one event loop, one thread)."""

    def __init__(self, ranks: list[int], node: str, plan: dict, *, monitor, metrics, coordinator, relay=None):
        from actors.metric_sender import MetricSender
        from orchestrator.hang.health import Health

        self.ranks, self.node, self.plan = ranks, node, plan
        self.monitor, self.metrics, self.coordinator, self.relay = monitor, metrics, coordinator, relay
        self.rng = random.Random(plan["seed"] * 100_003 + ranks[0])
        self.health = {r: Health(r) for r in ranks}
        # the real sender's buffer and batch numbering; its sending is done here, on the event loop
        self.senders = {r: MetricSender(metrics, r, flush_every_s=plan["flush_every_s"], background=False)
                        for r in ranks}
        self.frozen: set[int] = set()
        self.logged = self.beats_sent = self.skipped = 0
        self.late: list[float] = []  # how far behind its schedule each timer fired
        self.grants: list[float] = []
        self.writes: list[tuple[float, float]] = []
        self.write_errors: list[str] = []
        self.send_errors: list[str] = []
        self.writing: dict[int, asyncio.Task] = {}
        self.stopping: asyncio.Event | None = None
        self.stopped_at: float | None = None

    def pid(self) -> int:
        return os.getpid()

    async def stop(self) -> None:
        self.stopped_at = time.time()
        self.stopping.set()

    # --- the schedule -----------------------------------------------------------------------

    async def _at(self, when: float) -> bool:
        """Sleep until `when` (wall clock); False once the bench says stop."""
        delay = when - time.time()
        if delay > 0:
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass
        if self.stopping.is_set():
            return False
        self.late.append(max(0.0, time.time() - when))
        return True

    def _ticks(self, every_s: float, phase: float):
        """Due times every_s apart from t0 + phase; a tick missed entirely is skipped, not bunched."""
        k = 0
        while True:
            due = self.plan["t0"] + phase + k * every_s
            yield due
            k = max(k + 1, int((time.time() - self.plan["t0"] - phase) / every_s) + 1)

    # --- side threads, one task each per rank (or one per node when aggregating) -------------

    async def _heartbeats(self, ranks: list[int]) -> None:
        last = None  # the latest answer is kept, as the real thread does (it carries dump requests)
        for due in self._ticks(self.plan["heartbeat_s"], self.rng.uniform(0, self.plan["heartbeat_s"])):
            if not await self._at(due):
                return
            live = [r for r in ranks if r not in self.frozen]
            if not live:
                return
            if self.plan["aggregate"]:
                last = self.monitor.beat_many.remote([self.health[r].snapshot() for r in live])
            elif self.relay is not None:
                last = self.relay.beat.remote(self.health[live[0]].snapshot())
            else:
                last = self.monitor.beat.remote(self.health[live[0]].snapshot())
            self.beats_sent += len(live)
        del last

    async def _flushes(self, ranks: list[int]) -> None:
        for due in self._ticks(self.plan["flush_every_s"], self.rng.uniform(0, self.plan["flush_every_s"])):
            if not await self._at(due):
                return
            live = [r for r in ranks if r not in self.frozen]
            if not live:
                return
            await self._send(live)

    async def _send(self, ranks: list[int]) -> bool:
        """Every pending batch of these ranks, oldest first; what fails stays queued for the next flush."""
        for r in ranks:
            self.senders[r]._take()
        try:
            if self.plan["aggregate"]:
                while True:
                    batch = [(r, *self.senders[r].pending[0][:2], self.senders[r].dropped_points)
                             for r in ranks if self.senders[r].pending]
                    if not batch:
                        return True
                    await wait_ref(self.metrics.log_columns_many.remote(batch), 30.0)
                    for r, *_ in batch:
                        self._sent(r)
            send = self.relay.log_columns if self.relay is not None else self.metrics.log_columns_grouped
            for r in ranks:
                s = self.senders[r]
                while s.pending:
                    seq, cols, _ = s.pending[0]
                    await wait_ref(send.remote(r, seq, cols, s.dropped_points), 30.0)
                    self._sent(r)
        except Exception as e:  # kept, sent again next time, as the real sender does
            self.send_errors.append(f"{type(e).__name__}: {str(e).strip()[:200]}")
            return False
        return True

    def _sent(self, rank: int) -> None:
        s = self.senders[rank]
        _, _, n = s.pending.popleft()
        s.pending_points -= n
        s.sent_points += n

    async def _write(self, rank: int, step: int) -> None:
        """One shard write: jitter, a slot (asked again until granted), the write, the release."""
        await asyncio.sleep(self.rng.uniform(0, self.plan["start_jitter_s"]))
        asked = time.time()
        deadline = asked + self.plan["commit_timeout_s"]
        slot = None
        while slot is None:
            if time.time() > deadline:
                self.write_errors.append(f"rank {rank}: step {step}: no write slot within "
                                         f"{self.plan['commit_timeout_s']:g}s")
                return
            try:
                slot = await wait_ref(self.coordinator.acquire_wait.remote(rank, self.node, timeout_s=20.0), 60.0)
            except Exception as e:
                self.write_errors.append(f"rank {rank}: {type(e).__name__}: {e}")
                return
        self.grants.append(time.time() - asked)
        t0 = time.time()
        await asyncio.sleep(self.plan["write_s"])
        self.writes.append((t0, time.time()))
        try:
            await wait_ref(self.coordinator.release.remote(slot), 60.0)
        except Exception:  # the lease expires on its own
            pass

    # --- the training loop of every rank of this node ---------------------------------------

    async def _train(self) -> None:
        plan = self.plan
        step = 0
        while await self._at(plan["t0"] + step * plan["step_s"]):
            now = time.time()
            if now >= plan["freeze_at"]:
                break
            values = step_values(step, now, plan["step_s"], self.rng)
            for r in self.ranks:
                h = self.health[r]
                h.step, h.progress, h.phase = step, step + 1, "forward"
                h.coll_entered += 1
                h.coll_completed += 1
                self.senders[r].log(values, step=step)
                self.logged += len(values)
            if step and step % plan["ckpt_every"] == 0:
                for r in self.ranks:
                    task = self.writing.get(r)
                    if task is not None and not task.done():
                        self.skipped += 1  # its last checkpoint is still being written: one at a time
                    else:
                        self.writing[r] = asyncio.ensure_future(self._write(r, step))
            step += 1
        for r in self.ranks:  # the others wait in the collective the frozen rank never joins
            h = self.health[r]
            h.phase = "backward"
            h.coll_entered += 1

    async def _freeze(self, rank: int) -> None:
        """SIGSTOP, as the monitor and the metrics actor see it: its beats and flushes stop."""
        if await self._at(self.plan["freeze_at"]):
            self.frozen.add(rank)

    async def run(self, schedule: dict) -> dict:
        """schedule: t0 (the first step) and freeze_at, wall clock."""
        self.plan.update(schedule)
        self.stopping = asyncio.Event()
        groups = [self.ranks] if self.plan["aggregate"] else [[r] for r in self.ranks]
        tasks = [asyncio.ensure_future(c) for g in groups for c in (self._heartbeats(g), self._flushes(g))]
        tasks.append(asyncio.ensure_future(self._train()))
        if self.plan["frozen_rank"] in self.health:
            tasks.append(asyncio.ensure_future(self._freeze(self.plan["frozen_rank"])))
        beats_at = beats0 = None
        while not self.stopping.is_set():  # the beat rate after the freeze: does the simulator keep pace?
            await asyncio.sleep(0.5)
            if beats_at is None and time.time() >= self.plan["freeze_at"] + 1:
                beats_at, beats0 = time.time(), self.beats_sent
        beat_rate = None
        if beats_at is not None:
            live = len([r for r in self.ranks if r not in self.frozen]) or 1
            beat_rate = (self.beats_sent - beats0) / max(1e-9, (self.stopped_at or time.time()) - beats_at) / live
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        pending = [t for t in self.writing.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=120)
        stuck = sum(not t.done() for t in self.writing.values())
        unsent = []
        self.frozen.clear()  # what is left is delivered (the frozen one: as if sent SIGCONT)
        for _ in range(5):
            if await self._send(self.ranks):
                break
            await asyncio.sleep(1)
        else:
            unsent.append(f"{sum(s.pending_points for s in self.senders.values())} points undelivered: "
                          f"{self.send_errors[-1:]}")
        return {"logged": self.logged, "late": self.late, "beat_rate": beat_rate,
                "acked": sum(s.sent_points for s in self.senders.values()),
                "dropped": sum(s.dropped_points for s in self.senders.values()), "unsent": unsent,
                "grants": self.grants, "writes": self.writes, "write_errors": self.write_errors[:5],
                "n_write_errors": len(self.write_errors), "stuck": stuck, "skipped": self.skipped,
                "send_errors": len(self.send_errors)}
