"""Per-node relays of heartbeats and metrics (actors/node_relay.py): what they forward, how ranks
fall back when one is dead or stuck, and real runs through them (nothing lost or doubled, no false
hang, a frozen rank still named)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from actors.health import HealthMonitor
from actors.node_relay import RELAY_FROM_RANKS, NodeRelay, relay_nodes
from tests.conftest import cli_json, launch_in_background, tiny_config

# --- no Ray: fake handles whose .remote() answers through a future, as a Ray ObjectRef does ------


class Ref:
    def __init__(self, fn, args):
        self.f: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.f.set_result(fn(*args))
        except Exception as e:
            self.f.set_exception(e)

    def future(self):
        return self.f


class Never:
    """A call that is never answered (a stuck actor)."""

    def future(self):
        return concurrent.futures.Future()


class Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return Never() if self.fn is Never else Ref(self.fn, args)


class FakeMetrics:
    """log_columns_many as the metrics actor answers it: per batch, the points stored, once per seq."""

    def __init__(self, error: Exception | None = None):
        self.calls, self.error, self.last_seq = [], error, {}
        self.log_columns_many = Method(self._many)

    def _many(self, batches):
        self.calls.append(batches)
        if self.error:
            raise self.error
        out = []
        for rank, seq, cols, _ in batches:
            new = seq > self.last_seq.get(rank, 0)
            self.last_seq[rank] = max(seq, self.last_seq.get(rank, 0))
            out.append(sum(len(s) for s, _ in cols.values()) if new else 0)
        return out


def monitor_handle(monitor: HealthMonitor, stuck: bool = False):
    class Handle:
        beat_many = Method(Never) if stuck else Method(monitor.beat_many)
    return Handle()


def test_auto_relays_only_nodes_with_several_ranks_of_a_large_group():
    small = ["a", "a", "b"]
    assert relay_nodes("auto", small) == []  # a star of a few ranks costs the run's actors little
    big = ["a"] * (RELAY_FROM_RANKS // 2) + ["b"] * (RELAY_FROM_RANKS // 2 - 1) + ["c"]
    assert relay_nodes("auto", big) == ["a", "b"]  # c's one rank gains nothing from a hop
    assert relay_nodes("on", small) == ["a", "b"] and relay_nodes("off", big) == []


def test_relay_forwards_the_ranks_own_heartbeats_in_one_call():
    monitor = HealthMonitor()
    relay = NodeRelay("n1", monitor=monitor_handle(monitor), metrics=None, heartbeat_s=0.05, flush_every_s=0.05)
    sent = [{"rank": r, "step": 3, "phase": "forward", "time": 1000.0 + r} for r in range(4)]

    async def go():
        answers = [await relay.beat(dict(s)) for s in sent]
        await relay.beat({**sent[2], "time": 900.0, "step": 1})  # older than what rank 2 already sent: not kept
        while relay.tasks["beats"] is not None:
            await asyncio.sleep(0.01)
        return answers, await relay.counts()

    answers, counts = asyncio.run(go())
    assert answers and all(a["ok"] and a["request"] is None for a in answers)  # nothing heard from the monitor yet
    assert monitor.call_counts() == {"beat": 0, "beat_many": 1}
    assert monitor.snapshot() == {s["rank"]: s for s in sent}  # the ranks' own clock times, not the relay's
    assert counts["beats_in"] == 5 and counts["beat_calls"] == 1


def test_a_relay_whose_forwards_are_stuck_tells_its_ranks_to_beat_directly():
    relay = NodeRelay("n1", monitor=monitor_handle(HealthMonitor(), stuck=True), metrics=None, heartbeat_s=0.01,
                      flush_every_s=0.01, call_timeout_s=3600)

    async def go():
        first = await relay.beat({"rank": 0, "time": 1.0})
        await asyncio.sleep(0.02)
        await relay.beat({"rank": 0, "time": 2.0})  # the first is in a forward that never returns; this one waits
        await asyncio.sleep(0.2)  # far more than STUCK_TICKS ticks
        return first, await relay.beat({"rank": 0, "time": 3.0})

    first, later = asyncio.run(go())
    assert first["ok"] and not later["ok"]


def test_metric_batches_are_answered_with_the_actors_results_and_its_errors():
    cols = lambda step: {"train/loss": (np.array([step]), np.array([1.0]))}  # noqa: E731
    metrics = FakeMetrics()
    relay = NodeRelay("n1", monitor=None, metrics=metrics, heartbeat_s=0.05, flush_every_s=0.05)

    async def send(relay, batches):
        return await asyncio.gather(*(relay.log_columns(*b) for b in batches), return_exceptions=True)

    batches = [(r, 1, cols(0), 0) for r in range(3)]
    assert asyncio.run(send(relay, batches)) == [1, 1, 1]
    assert len(metrics.calls) == 1 and len(metrics.calls[0]) == 3  # one call for the node's three ranks
    assert asyncio.run(send(relay, batches[:1])) == [0]  # sent again (a rank's retry): skipped by seq
    broken = NodeRelay("n1", monitor=None, metrics=FakeMetrics(error=OSError("disk full")), heartbeat_s=0.05,
                       flush_every_s=0.05)
    results = asyncio.run(send(broken, batches))
    assert len(results) == 3 and all(isinstance(r, OSError) for r in results)  # every rank keeps its batch


def test_monitor_keeps_the_newer_heartbeat_of_a_rank_whichever_way_it_came():
    m = HealthMonitor()
    m.beat({"rank": 0, "step": 5, "time": 10.0})  # direct, while the relay was stuck
    m.beat_many([{"rank": 0, "step": 4, "time": 8.0}, {"rank": 1, "step": 4, "time": 8.0}])  # delivered late
    assert m.snapshot()[0]["step"] == 5 and m.snapshot()[1]["step"] == 4
    assert m.call_counts() == {"beat": 1, "beat_many": 1}


# --- a rank's sender against real actors -------------------------------------------------------


class SlowRelay:
    """A relay that takes batches and never answers (stuck), or forwards them late on request."""

    def __init__(self, metrics):
        self.metrics, self.held = metrics, []

    async def log_columns(self, rank, seq, columns, dropped=0):
        self.held.append((rank, seq, columns, dropped))
        await asyncio.sleep(3600)

    async def holding(self) -> int:
        return len(self.held)

    async def deliver_late(self) -> list[int]:
        return await self.metrics.log_columns_many.remote(self.held)


@pytest.mark.ray
def test_sender_falls_back_to_the_actor_when_its_relay_is_stuck_or_gone(tmp_path, ray_address):
    import ray

    from actors.metric_sender import MetricSender
    from actors.metrics_actor import MetricsActor
    from orchestrator.anomaly import AnomalyDetector
    from orchestrator.store import Store

    actor = ray.remote(MetricsActor).options(num_cpus=0, max_concurrency=100).remote(
        "relayed", str(tmp_path), open_store=Store, detector=AnomalyDetector())
    stuck = ray.remote(SlowRelay).options(num_cpus=0, max_concurrency=100).remote(actor)
    sender = MetricSender(actor, rank=0, flush_every_s=3600, background=False, relay=stuck, relay_timeout_s=1.0)
    for step in range(10):
        sender.log({"train/loss": float(step)}, step=step)
        assert sender.flush()  # the relay holds it and does not answer: it goes directly
    assert sender.relay_fallbacks == 1 and sender.relay is stuck  # skipped for a while, not for good
    deadline = time.monotonic() + 120  # an async actor runs calls in no set order: wait until it holds the batch
    while ray.get(stuck.holding.remote(), timeout=60) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.get(stuck.deliver_late.remote(), timeout=60) == [0]  # what it held arrives after all: applied once
    ray.kill(stuck)
    sender.relay_back_at = 0.0  # its backoff over: tried again, found dead, dropped
    sender.log({"train/loss": 10.0}, step=10)
    assert sender.flush() and sender.relay is None
    store = Store(tmp_path)
    (sid, _, _, n), = store.points.find("relayed", "train/loss")
    assert n == 11 and list(store.points.read(sid).steps) == list(range(11))  # none lost, none twice
    store.close()
    ray.kill(actor)


# --- real runs through the relays ----------------------------------------------------------------


def _relays(run_id: str) -> list:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "orchestrator" and f":{run_id}:relay:" in a["name"]]
    return [ray.get_actor(n, namespace="orchestrator") for n in names]


def _run_id(home) -> str | None:
    runs = cli_json("runs", home=home) if (home / "store.db").exists() else []
    return runs[0]["id"] if runs else None


def _step(home, run_id) -> int:
    keys = cli_json("metrics", run_id, home=home)["keys"]
    if "train/loss" not in keys:
        return -1
    pts = cli_json("metrics", run_id, "--key", "train/loss", home=home)["points"]
    return pts[-1]["step"] if pts else -1


def _launch(cfg, home, ray_address) -> subprocess.Popen:
    return launch_in_background(cfg, home=home, address=ray_address, stderr=subprocess.STDOUT)


def _wait(cond, deadline: float, proc: subprocess.Popen, what: str):
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}:\n{proc.stdout.read()}")
        time.sleep(0.3)
    raise AssertionError(f"not within the deadline: {what}")


@pytest.mark.ray
def test_ranks_go_through_the_relay_which_may_stall_and_die_without_loss_or_false_hang(tmp_path, home, tiny_data,
                                                                                         ray_address):
    import ray

    from orchestrator.store import Store

    steps = 200
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": steps, "eval_every": 0},
                      telemetry={"relay": "on", "flush_every_s": 0.2}, hang={"timeout_s": 15, "heartbeat_s": 2.0},
                      model={"factory": "tests.user_models:slow_gpt", "kwargs": {"pause_s": 0.15}})
    proc = _launch(cfg, home, ray_address)
    stopped = None
    try:
        deadline = time.monotonic() + 600  # generous: a busy machine is slow
        run_id = _wait(lambda: _run_id(home), deadline, proc, "the run was recorded")
        (relay,) = _wait(lambda: _relays(run_id), deadline, proc, "the relay started")
        monitor = ray.get_actor(f"tiny:{run_id}:health", namespace="orchestrator")
        _wait(lambda: _step(home, run_id) >= 5, deadline, proc, "step 5")
        calls0 = ray.get(monitor.call_counts.remote(), timeout=60)
        calls = _wait(lambda: (c := ray.get(monitor.call_counts.remote(), timeout=60))["beat_many"] >= calls0["beat_many"] + 4
                      and c, deadline, proc, "4 relayed heartbeat calls")
        counts = ray.get(relay.counts.remote(), timeout=60)
        # through the relay: the node's beats in beat_many calls; a rank beats directly only when the
        # relay leaves a beat unanswered for a tick (possible at start-up, or on a very busy machine)
        many, direct = calls["beat_many"] - calls0["beat_many"], calls["beat"] - calls0["beat"]
        assert many >= 2 and direct < many, (calls0, calls)
        assert counts["batches_in"] >= 2 and counts["metric_calls"] >= 1 and counts["metric_errors"] == 0, counts
        stopped = ray.get(relay.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        os.kill(stopped, signal.SIGSTOP)  # stuck: the ranks beat the monitor directly after a tick
        _wait(lambda: ray.get(monitor.call_counts.remote(), timeout=60)["beat"] >= calls["beat"] + 4, deadline, proc,
              "direct heartbeats around the stuck relay")
        os.kill(stopped, signal.SIGCONT)  # it wakes with stale beats and held batches: they must change nothing
        stopped = None
        at = _step(home, run_id)
        _wait(lambda: _step(home, run_id) >= at + 5, deadline, proc, "5 more steps")
        ray.kill(relay)  # and now gone for good
        out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    store = Store(home)
    assert store.events(run_id, "stall") == []  # no false hang from a stuck or dead relay
    series = store.points.find(run_id, "train/loss")
    assert sorted(rank for _, rank, _, _ in series) == [0, 1], series
    for sid, rank, _, n in series:
        got = list(store.points.read(sid).steps)
        assert n == len(got) == steps and got == sorted(set(got)), (rank, n, got)  # none lost, none twice
    store.close()


@pytest.mark.ray
def test_a_frozen_rank_is_named_with_the_relay_on(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 400, "eval_every": 0},
                      telemetry={"relay": "on"}, hang={"timeout_s": 15, "heartbeat_s": 2.0},
                      fault_tolerance={"max_restarts": 0},
                      model={"factory": "tests.user_models:slow_gpt", "kwargs": {"pause_s": 0.05}})
    proc = _launch(cfg, home, ray_address)
    frozen = None
    try:
        deadline = time.monotonic() + 600
        run_id = _wait(lambda: _run_id(home), deadline, proc, "the run was recorded")
        _wait(lambda: _relays(run_id), deadline, proc, "the relay started")
        _wait(lambda: _step(home, run_id) >= 12, deadline, proc, "step 12")
        frozen = next(w for w in cli_json("show", run_id, home=home)["meta"]["workers"] if w["rank"] == 1)["pid"]
        os.kill(frozen, signal.SIGSTOP)  # rank 1 frozen; the relay beside it still forwards rank 0's beats
        out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0 and "STALL" in out and "heartbeats stopped" in out, out
    (d,) = cli_json("diagnose", run_id, home=home)["events"]
    assert (d["verdict"], d["culprits"]) == ("stopped", [1]), d
