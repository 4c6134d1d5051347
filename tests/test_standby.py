"""Warm spare workers (orchestrator/standby.py): where they wait, and which a restart takes. The
end-to-end path (SIGKILLed ranks replaced by spares, bit for bit) is in test_fault_tolerance."""

from __future__ import annotations

import os
import time

import pytest
import ray

from orchestrator import priority, standby
from orchestrator.standby import Standby


def node(node_id: str, cpus: float, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpus}}


def test_spares_wait_beside_each_rank_and_on_nodes_with_room(monkeypatch):
    nodes = [node("a", 2), node("b", 2), node("c", 4), node("d", 1), node("e", 8, alive=False), node("f", 0.5)]
    monkeypatch.setattr(standby.ray, "nodes", lambda: nodes)
    pool = Standby("run", make=None, warm=None)
    # one per rank on its node; elsewhere as many as the busiest node has ranks (2), at most 3 in all
    assert pool.wanted(["a", "a", "b"], {"CPU": 1}) == {"a": 2, "b": 1, "c": 2, "d": 1}
    # a node too small for a worker, or dead, gets none
    assert pool.wanted(["a"], {"CPU": 3}) == {"a": 1, "c": 1}
    assert pool.wanted([], {"CPU": 1}) == {}


@ray.remote(num_cpus=0, concurrency_groups={"control": 1})  # as the real worker's
class FakeWorker:
    def node_info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id()}

    def execute(self, fn, *args):
        return fn(*args)


def wait_dead(actor, bound_s: float = 120.0) -> None:
    """ray.kill only asks the GCS: a call sent right after it may still be answered."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.node_info.remote(), timeout=bound_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError(f"actor still answers {bound_s:.0f} s after ray.kill")


@pytest.mark.ray
def test_a_restart_takes_warm_answering_spares_only(ray_address):
    here = ray.get_runtime_context().get_node_id()
    made = []

    def make(name, node_id):
        made.append(name)
        return FakeWorker.remote()

    slow = {"next": False}

    def warm(w):  # the third spare is still warming up when the restart comes
        return w.execute.remote(time.sleep, 60 if slow["next"] else 0)

    pool = Standby("run", make, warm)
    assert pool.fill({here: 2}) == 2
    slow["next"] = True
    assert pool.fill({here: 3}) == 1  # the two it has are kept
    assert made == ["run:standby0", "run:standby1", "run:standby2"]
    assert pool.warmed() is None  # the last fill's warm-up is the slow one
    first, second = (w for w, _ in pool.spares[here][:2])
    ray.get([first.execute.remote(time.sleep, 0), second.execute.remote(time.sleep, 0)], timeout=120)
    ray.kill(second)  # a spare that died since: dropped, a new worker instead
    wait_dead(second)
    taken = pool.take([here, here, here])
    assert taken[0] is first and taken[1] is None and taken[2] is None
    assert pool.used == 1 and pool.count() == 1  # the warming one stays for later
    pool.kill()
    assert pool.count() == 0


def thread_niceness() -> list[int]:
    return sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")})


@pytest.mark.ray
def test_with_no_warm_spare_a_restart_takes_a_warming_one_at_a_ranks_priority(ray_address):
    here = ray.get_runtime_context().get_node_id()
    started = []

    def make(name, node_id):
        started.append(FakeWorker.remote())
        return started[-1]

    def boost(w):
        return w.execute.options(concurrency_group="control").remote(priority.normal_priority)

    pool = Standby("run", make, warm=lambda w: w.execute.remote(time.sleep, 60), boost=boost)
    assert pool.fill({here: 1}) == 1
    before = ray.get(started[0].execute.options(concurrency_group="control").remote(thread_niceness), timeout=120)
    taken = pool.take([here, here])  # its warm-up has 60 s to go: taken anyway, one node's only spare
    assert taken[0] is started[0] and taken[1] is None
    assert pool.boosted == 1 and pool.used == 1 and pool.count() == 0
    after = ray.get(taken[0].execute.options(concurrency_group="control").remote(thread_niceness), timeout=120)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert before and max(before) > mine  # Ray started it niced (worker_niceness)
    if os.geteuid() == 0:  # lowering niceness needs privileges: every thread, the warming one too
        assert after == [mine]
    pool.kill()
    ray.kill(taken[0])
