"""The control loop with a fake worker group and a fake clock: every path a real run takes
(restarts, the budget, stalls, regrowing, straggler replacement, SIGTERM), in milliseconds, with
the real store recording it."""

from __future__ import annotations

import threading
import time

import pytest

from common.errors import ResourceError
from orchestrator.config import config_from_dict
from orchestrator.controller import Controller, RunFailed, keeps_placement
from orchestrator.policy import Failure, FailureKind, GroupError
from orchestrator.store import Store


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class FakeGroup:
    """Scripts per attempt: a list of what each wait() does: "step" (one more step done),
    "hang" (nothing moves), "done" (every rank finished) or a Failure (the group failed)."""

    def __init__(self, clock: Clock, scripts: list[list], *, committed=(), free=None, alerts=None, frozen_rank=None):
        self.clock, self.scripts = clock, list(scripts)
        self.committed = list(committed)
        self.free = free or {}
        self.alerts = alerts or {}  # step -> alerts the metrics actor reports then
        self.frozen_rank = frozen_rank
        self.reserved, self.started, self.stops, self.checked = [], [], 0, []
        self.kept_placement = []  # per stop: whether the placement group was to stay
        self.nodes: list[str] = []
        self.world = 0
        self.spares: list[dict] = []  # per start: the standby counts it reports, if any
        self.finished: frozenset[int] = frozenset()  # ranks whose training call has returned
        self.check_report: dict | None = None  # what the node checks find
        self.hold_checks, self.release, self.held = 0, threading.Event(), []  # checks that run until "release"
        self.controller = None

    # what the controller calls
    def reserve(self, sizes, avoid_nodes):
        for n in sizes:
            if n <= self.free.get("workers", sizes[0]):
                self.reserved.append((n, tuple(avoid_nodes)))
                self.world = n
                return n, ("restarted without node " + ", ".join(avoid_nodes)) if avoid_nodes else None
        raise ResourceError(f"cannot reserve {sizes[0]} workers")

    def start_run_actors(self):
        return None

    def set_attempt(self, attempt):
        self.attempt = attempt

    def committed_steps(self):
        return "mem://ckpt", sorted(self.committed)

    def start(self, attempt):
        self.started.append(attempt)
        self.script = self.scripts.pop(0)
        self.step = -1
        self.nodes = [f"node-{r}" for r in range(self.world)]
        if self.script and self.script[0] == "fail-start":
            raise GroupError(Failure(FailureKind.DIED, "rank 0 died during start", rank=0, node_id="node-0"))
        return {"workers": [], "world": self.world, "nodes": self.world, "backend": "gloo", "master": "x:1",
                "seconds": 0.1, **(self.spares.pop(0) if self.spares else {})}

    def train(self, step0, source_uri, skipped):
        self.step0, self.skipped = step0, skipped
        self.step = (step0 or 0) - 1

    def wait(self, timeout_s):
        self.clock.t += timeout_s
        what = self.script.pop(0) if self.script else "hang"
        if isinstance(what, Failure):
            raise GroupError(what)
        if what == "done":
            return [{"steps": self.step + 1, "train_time_s": 1.0, "first_loss": 5.0, "last_loss": 1.0}] * self.world
        if what == "stopped":  # the ranks agreed on a step, saved it and ended (`orchestrator stop`)
            self.committed.append(self.step + 1)
            return [{"steps": self.step + 1, "train_time_s": 1.0, "stopped": True, "stopped_at": self.step + 1}] * self.world
        if what == "step":
            self.step += 1
        if what == "release":  # node checks held by hold_checks may end now
            self.release.set()
        if what == "checked":  # one more step, once the controller's node checks have ended
            deadline = time.monotonic() + 60
            while not self.controller.checks[2].done() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.step += 1
        if what == "ckpt":
            self.step += 1
            self.committed.append(self.step + 1)
        return None

    def poll(self):
        return {"progress": self.progress(), "alerts": self.alerts.pop(self.step, [])}

    def progress(self):
        return {"step": self.step, "max_step": self.step, "median_step_time_s": 0.1} if self.step >= 0 else {}

    def take_alerts(self):
        return []

    def heartbeats(self):
        now = time.time()
        beats = {}
        for r in range(self.world):
            frozen = r == self.frozen_rank
            beats[r] = {"rank": r, "step": self.step, "phase": "forward" if frozen else "backward",
                        "progress": self.step + 1, "coll_entered": self.step + (0 if frozen else 1),
                        "coll_completed": self.step, "time": now - (100 if frozen else 0)}
        return beats

    def finished_ranks(self):
        return self.finished

    def flight_recorder(self, report, folder):
        return {"summary": "fake recorder", "ranks": {}, "culprits": []}

    def check_suspects(self, report):
        self.checked.append(list(report["culprit_nodes"]))
        self.checked_at = (self.attempt, self.step)
        if self.hold_checks:
            self.hold_checks -= 1
            self.held.append(self.release.wait(30))  # False: nobody released them (the controller waited on them)
        return self.check_report or {"problems": []}

    def free_resources(self):
        return {"CPU": self.free.get("CPU", 0)}

    def read_processes(self, node, pids):
        return None

    def node(self, rank):
        return self.nodes[rank] if rank is not None and 0 <= rank < len(self.nodes) else None

    def stop(self, *, keep_placement=False):
        self.stops += 1
        self.kept_placement.append(keep_placement)

    def request_stop(self):
        self.stop_requests = getattr(self, "stop_requests", 0) + 1
        self.script = ["step", "stopped"]  # one more step to the agreed boundary, then the final checkpoint


def setup(tmp_path, scripts, *, first_attempt=0, restore=None, **kw):
    sections = {"data": {"uri": "unused", "global_batch_size": 8}, "scaling": {"num_workers": 2},
                "train": {"max_steps": 100}, "telemetry": {"progress_every_s": 1.0},
                "hang": {"timeout_s": 5, "first_step_timeout_s": 5, "heartbeat_s": 1.0}}
    for key, value in kw.pop("cfg", {}).items():
        sections.setdefault(key, {}).update(value)
    cfg = config_from_dict(sections)
    store = Store(tmp_path / "home")
    store.create_run(run_id="r1", name="t", config={}, git_commit=None, host="h", command="", world_size=2)
    clock = Clock()
    group = FakeGroup(clock, scripts, **kw)
    lines: list[str] = []
    c = group.controller = Controller(cfg, "r1", store, group, lines.append, first_attempt=first_attempt,
                                      restore=restore, clock=clock, sleep=clock.sleep)
    return c, group, store, lines


def died(rank=1):
    return Failure(FailureKind.DIED, f"rank {rank} died (process killed or out of memory) during training",
                   rank=rank, node_id=f"node-{rank}")


def test_a_clean_run_completes_and_records_one_attempt(tmp_path):
    c, group, store, lines = setup(tmp_path, [["step", "step", "done"]])
    summary = c.run()
    assert summary["steps"] == 2 and summary["restarts"] == 0
    assert [(a["attempt"], a["status"]) for a in store.attempts("r1")] == [(0, "completed")]
    assert any(line.startswith("rendezvous done: 2 ranks") for line in lines)


def test_two_deaths_restart_from_the_latest_checkpoint_and_complete(tmp_path):
    scripts = [["ckpt", "step", died()], ["fail-start"], ["step", "ckpt", "done"]]
    c, group, store, lines = setup(tmp_path, scripts)
    summary = c.run()
    assert summary["restarts"] == 2
    attempts = store.attempts("r1")
    assert [a["status"] for a in attempts] == ["failed", "failed", "completed"]
    assert attempts[0]["cause"] == "died" and attempts[0]["steps_lost"] == 1  # step 1 done, checkpoint at 1
    assert [a["resumed_from_step"] for a in attempts] == [None, 1, 1]
    assert group.stops == 2 and group.started == [0, 1, 2]
    assert group.kept_placement == [True, True]  # a dead rank's node still holds the next group
    assert attempts[2]["recovery_s"] is not None
    assert [e["kind"] for e in store.events("r1")] == ["failure_died", "failure_died"]
    assert sum("RESTART" in line for line in lines) == 2


def test_a_restart_that_found_no_warm_spare_says_so(tmp_path):
    c, group, store, lines = setup(tmp_path, [["ckpt", "step", died()], ["step", "done"]],
                                   cfg={"fault_tolerance": {"standby_workers": True}})
    c.run()
    rendezvous = [line for line in lines if line.startswith("rendezvous done")]
    assert len(rendezvous) == 2
    assert "no standby worker" not in rendezvous[0]  # a first start is cold anyway: not worth a word
    assert "no standby worker was there yet" in rendezvous[1] and "resuming at step 1" in rendezvous[1]


def test_a_restart_says_how_many_spares_it_took_and_how_many_were_still_warming(tmp_path):
    c, group, store, lines = setup(tmp_path, [["ckpt", "step", died()], ["step", died()], ["step", "done"]],
                                   cfg={"fault_tolerance": {"standby_workers": True}})
    group.spares = [{}, {"standby_used": 2, "standby_boosted": 1}, {"standby_used": 2, "standby_boosted": 0,
                    "stages": {"workers": 0.44, "storage check": 0.06, "process group": 1.25}}]
    c.run()
    rendezvous = [line for line in lines if line.startswith("rendezvous done")]
    assert len(rendezvous) == 3
    assert "s: workers 0.4, storage check 0.1, process group 1.2), resuming at step" in rendezvous[2]  # where it went
    assert rendezvous[1].endswith("; 2 of them standby workers, 1 still warming up (finishing at full priority)")
    assert rendezvous[2].endswith("; 2 of them warm standby workers")


def test_a_rank_that_finished_while_its_peer_ends_the_run_is_not_a_stall(tmp_path):
    """At the run's end rank 1's call has returned (no more heartbeats) while rank 0 still commits
    the final checkpoint: seen once under load as a false stall and a needless restart."""
    c, group, store, lines = setup(tmp_path, [["step"] * 3 + ["hang"] * 8 + ["done"]], frozen_rank=1,
                                   cfg={"hang": {"timeout_s": 60}})  # the commit takes a while: no step all along
    group.finished = frozenset({1})
    c.run()
    assert not store.events("r1", kind="stall") and not any("STALL" in line for line in lines), lines
    assert [a["status"] for a in store.attempts("r1")] == ["completed"]


def test_the_restart_budget_ends_the_run_with_a_clear_message(tmp_path):
    c, group, store, _ = setup(tmp_path, [[died()], [died()]], cfg={"fault_tolerance": {"max_restarts": 1}})
    with pytest.raises(RunFailed, match=r"rank 1 died .* \(after 1 restart; fault_tolerance.max_restarts=1\)"):
        c.run()
    assert [a["status"] for a in store.attempts("r1")] == ["failed", "failed"]


def test_no_resources_raise_the_clusters_error(tmp_path):
    c, group, _, _ = setup(tmp_path, [["done"]], free={"workers": 1})
    with pytest.raises(ResourceError, match="cannot reserve 2 workers"):
        c.run()


def test_a_frozen_rank_is_named_checked_and_avoided_on_restart(tmp_path):
    c, group, store, lines = setup(tmp_path, [["step"] + ["hang"] * 20, ["step", "done"]], frozen_rank=1)
    c.run()
    stall = store.events("r1", kind="stall")
    assert len(stall) == 1 and stall[0]["rank"] == 1
    assert stall[0]["data"]["verdict"] == "stopped" and stall[0]["data"]["culprit_nodes"] == ["node-1"]
    assert stall[0]["data"]["node_checks"] == {"problems": []}
    assert stall[0]["data"]["placement"] == "restarted without node node-1"
    assert group.checked == [["node-1"]]
    assert group.checked_at[0] == 1 and group.checked_at[1] >= 0  # once the next group did a step, not beside its restore
    assert group.reserved[1] == (2, ("node-1",))
    assert store.attempts("r1")[0]["cause"] == "hang"
    assert group.kept_placement == [False]  # a hung group's placement goes (its frozen worker may never die)


def test_a_second_stall_restarts_without_waiting_for_the_first_stall_s_node_checks(tmp_path):
    c, group, store, lines = setup(tmp_path, [["step"] + ["hang"] * 20, ["step", "step"] + ["hang"] * 20,
                                              ["step", "release", "checked", "step", "done"]], frozen_rank=1)
    group.hold_checks = 1  # the first stall's checks still run when the second stall comes
    c.run()
    assert group.held == [True]  # released by the third group: the second restart did not wait for them
    assert sum(line.startswith("RESTART") for line in lines) == 2
    stalls = store.events("r1", kind="stall")
    assert len(stalls) == 2 and all(s["data"]["node_checks"] == {"problems": []} for s in stalls)
    assert group.checked == [["node-1"], ["node-1"]]  # one set at a time, in order


def test_a_culprit_node_that_passes_its_checks_is_used_again_after_the_next_failure(tmp_path):
    c, group, store, lines = setup(tmp_path, [["step"] + ["hang"] * 20, ["step", "checked", "step", died(0)],
                                              ["step", "done"]], frozen_rank=1)
    healthy = {"role": "suspect", "host": {}, "gpu": {}, "compute": {"gflops": 1.0}, "problems": []}
    group.check_report = {"nodes": {"node-1": healthy}, "probes": [{"a": "node-1", "ok": True}], "problems": []}
    c.run()
    assert [avoid for _, avoid in group.reserved] == [(), ("node-1",), ()]
    assert any(line.startswith("node node-1 passed its checks after the stall") for line in lines), lines


def test_the_placement_group_stays_only_where_the_node_is_known_to_be_fine():
    assert keeps_placement(Failure(FailureKind.DIED, "rank 1 died"))  # Ray saw the process die
    assert keeps_placement(Failure(FailureKind.EXCEPTION, "rank 0 raised"))
    # inferred from lost connections: the node may be gone before Ray says so
    assert not keeps_placement(Failure(FailureKind.DIED, "rank 1 stopped answering", data={"unconfirmed": True}))
    assert not keeps_placement(Failure(FailureKind.EXCEPTION, "reset by peer", data={"peer_lost": True}))
    assert not keeps_placement(Failure(FailureKind.NODE_LOST, "node gone"))
    assert not keeps_placement(Failure(FailureKind.GPU, "Xid 79"))


def test_a_stall_without_evidence_names_nobody_and_avoids_no_node(tmp_path):
    c, group, store, _ = setup(tmp_path, [["step"] + ["hang"] * 20, ["done"]])
    c.run()
    stall = store.events("r1", kind="stall")[0]
    assert stall["rank"] is None and stall["data"]["verdict"] == "undecided"
    assert group.reserved[1] == (2, ())


def test_an_elastic_run_regrows_at_the_next_checkpoint_without_using_a_restart(tmp_path):
    # one worker fits at first; then room for the second appears, and the next checkpoint regrows
    c, group, store, lines = setup(tmp_path, [["step", "step", "step", "ckpt", "step"], ["step", "done"]],
                                   free={"workers": 1, "CPU": 4}, cfg={"scaling": {"min_workers": 1},
                                                                       "fault_tolerance": {"max_restarts": 0}})
    group.reserve_sizes = []
    orig = group.reserve

    def reserve(sizes, avoid):
        group.reserve_sizes.append(list(sizes))
        if len(group.reserved) == 1:
            group.free["workers"] = 2
        return orig(sizes, avoid)

    group.reserve = reserve
    summary = c.run()
    assert group.reserve_sizes[0] == [2, 1] and [n for n, _ in group.reserved] == [1, 2]
    assert summary["restarts"] == 0
    assert [a["status"] for a in store.attempts("r1")] == ["resized", "completed"]
    assert any("regrowing at the next checkpoint" in line for line in lines)


def test_a_straggler_is_replaced_at_the_next_checkpoint_away_from_its_node(tmp_path):
    alert = {"id": 0, "kind": "straggler", "severity": "warning", "rank": 1, "message": "rank 1 is slow",
             "data": {"score": 0.5}}
    c, group, store, lines = setup(tmp_path, [["step", "step", "ckpt", "step"], ["done"]], alerts={1: [alert]},
                                   cfg={"hang": {"straggler_action": "restart"}})
    alert["id"] = store.add_event("r1", kind="straggler", severity="warning", message="rank 1 is slow", rank=1)
    summary = c.run()
    assert summary["restarts"] == 1
    assert [a["status"] for a in store.attempts("r1")] == ["replaced", "completed"]
    assert group.reserved[1] == (2, ("node-1",))
    assert store.events("r1", kind="straggler")[0]["data"]["placement"] == "restarted without node node-1"


def test_sigterm_ends_the_attempt_as_interrupted_and_reaches_the_driver(tmp_path):
    c, group, store, _ = setup(tmp_path, [["step", KeyboardInterrupt]])
    real_wait = group.wait

    def wait(timeout_s):
        if group.script and group.script[0] is KeyboardInterrupt:
            raise KeyboardInterrupt
        return real_wait(timeout_s)

    group.wait = wait
    with pytest.raises(KeyboardInterrupt):
        c.run()
    assert [a["status"] for a in store.attempts("r1")] == ["interrupted"] and group.stops == 1


def test_a_stop_request_ends_the_attempt_as_stopped(tmp_path):
    c, group, store, _ = setup(tmp_path, [["step"] * 50])
    asked = {"n": 0}

    def stop_requested():
        asked["n"] += 1
        return asked["n"] > 3  # after a few ticks of training

    c.stop_requested = stop_requested
    with pytest.raises(KeyboardInterrupt):
        c.run()
    assert [a["status"] for a in store.attempts("r1")] == ["stopped"] and group.stops == 1
    assert group.stop_requests == 1  # the ranks were asked once, and ended at a step with its checkpoint
    assert group.committed and group.committed[-1] == group.step + 1


def test_ranks_that_do_not_stop_in_time_are_stopped_without_a_final_checkpoint(tmp_path):
    c, group, store, out = setup(tmp_path, [["step"] * 500], cfg={"fault_tolerance": {"stop_timeout_s": 10}})
    group.request_stop = lambda: None  # the ranks never reach a step boundary
    c.stop_requested = lambda: True
    with pytest.raises(KeyboardInterrupt):
        c.run()
    assert [a["status"] for a in store.attempts("r1")] == ["stopped"] and group.stops == 1
    assert any("did not end within 10s" in line for line in out), out


def xid_alert(xid_number: int, rank: int = 1) -> dict:
    from orchestrator.hang import xid

    return xid.to_event(xid_number, gpu=0, uuid="GPU-x", node_id=f"node-{rank}", rank=rank)


def test_a_fatal_gpu_xid_restarts_at_once_without_its_node(tmp_path):
    """Xid 79 (fallen off the bus): no waiting for NCCL's timeout; the next group avoids the node."""
    c, group, store, lines = setup(tmp_path, [["step", "step"] + ["hang"] * 20, ["step", "done"]],
                                   alerts={1: [xid_alert(79)]}, cfg={"scaling": {"gpus_per_worker": 1}})
    c.run()
    first = store.attempts("r1")[0]
    assert (first["cause"], first["node"], first["rank"]) == ("gpu", "node-1", 1)
    assert "Xid 79" in first["message"] and "fallen off the bus" in first["message"]
    assert group.reserved[1] == (2, ("node-1",)) and not store.events("r1", kind="stall")
    assert any(line.startswith("RESTART 1/") and "Xid 79" in line for line in lines)


def test_a_contained_ecc_xid_restarts_on_the_same_nodes_and_a_warning_xid_does_nothing(tmp_path):
    c, group, store, _ = setup(tmp_path, [["step", "step", "step"] + ["hang"] * 20, ["step", "done"]],
                               alerts={0: [xid_alert(63)], 1: [xid_alert(94)]}, cfg={"scaling": {"gpus_per_worker": 1}})
    c.run()
    first = store.attempts("r1")[0]
    assert first["cause"] == "gpu" and "Xid 94" in first["message"] and first["failed_step"] == 1  # not at 63's step
    assert group.reserved[1] == (2, ())


def test_a_vague_nccl_error_after_an_xid_is_blamed_on_the_xids_node(tmp_path):
    """Rank 0 reports the timeout; the Xid that caused it came from rank 1's GPU."""
    timeout = Failure(FailureKind.NCCL, "rank 0 failed during training: DistBackendError: Watchdog caught collective "
                      "operation timeout", rank=0, node_id="node-0")
    c, group, store, lines = setup(tmp_path, [["step", timeout], ["step", "done"]],
                                   cfg={"scaling": {"gpus_per_worker": 1}})
    pending = [xid_alert(48)]
    group.take_alerts = lambda: [pending.pop()] if pending else []
    c.run()
    first = store.attempts("r1")[0]
    assert (first["cause"], first["node"], first["rank"]) == ("gpu", "node-1", 1)
    assert "Xid 48" in first["message"] and "then rank 0 failed" in first["message"]
    assert group.reserved[1] == (2, ("node-1",))
