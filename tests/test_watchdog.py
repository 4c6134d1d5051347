"""The watchdog's evidence rules, one case at a time, on a fake clock: a culprit is named in
seconds when the heartbeats prove one, and only the fixed threshold judges the rest."""

from __future__ import annotations

from orchestrator.hang.watchdog import MIN_EVIDENCE_S, Watchdog

WALL = 10_000.0


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def make(**kw):
    clock = Clock()
    dog = Watchdog(timeout_s=45, first_step_timeout_s=300, step_time_factor=10, heartbeat_s=1.0,
                   evidence_factor=kw.pop("evidence_factor", 5.0), clock=clock, wall=lambda: WALL + clock.t)
    return dog, clock


def beat(rank, *, step=9, phase="backward", entered=10, completed=9, age=0.0, clock=None, progress=10):
    return {"rank": rank, "step": step, "phase": phase, "progress": progress, "coll_entered": entered,
            "coll_completed": completed, "time": WALL + clock.t - age}


def check(dog, beats, median=0.5):
    return dog.check(beats, median_step_s=median, world=len(beats), nodes=["node-a", "node-b"])


def test_a_rank_whose_heartbeats_stopped_is_named_after_three_beats():
    dog, clock = make()
    check(dog, {0: beat(0, clock=clock), 1: beat(1, clock=clock)})  # progress seen at t=0
    clock.t = 4.0
    assert check(dog, {0: beat(0, clock=clock), 1: beat(1, age=4.0, clock=clock)}) is None  # not yet 3 beats + slack
    clock.t = 6.0
    report = check(dog, {0: beat(0, clock=clock), 1: beat(1, age=6.0, clock=clock)})
    assert report["early"] and report["verdict"] == "stopped" and report["culprits"] == [1]
    assert report["culprit_nodes"] == ["node-b"] and "rank 1 on node node-b" in report["message"]


def test_when_every_rank_looks_stale_the_monitor_is_suspect_not_a_rank():
    dog, clock = make()
    check(dog, {0: beat(0, clock=clock), 1: beat(1, clock=clock)})
    clock.t = 20.0
    assert check(dog, {0: beat(0, age=20, clock=clock), 1: beat(1, age=20, clock=clock)}) is None
    clock.t = 46.0  # the fixed threshold still applies
    assert check(dog, {0: beat(0, age=46, clock=clock), 1: beat(1, age=46, clock=clock)})["early"] is False


def test_a_rank_computing_while_the_others_wait_is_named_after_k_median_steps():
    dog, clock = make()
    stuck = {0: beat(0, clock=clock), 1: beat(1, phase="forward", entered=9, completed=9, clock=clock)}
    check(dog, stuck)
    clock.t = MIN_EVIDENCE_S - 0.5
    assert check(dog, {0: beat(0, clock=clock), 1: beat(1, phase="forward", entered=9, completed=9, clock=clock)}) is None
    clock.t = MIN_EVIDENCE_S + 0.5
    report = check(dog, {0: beat(0, clock=clock), 1: beat(1, phase="forward", entered=9, completed=9, clock=clock)})
    assert report["early"] and report["verdict"] == "missing_collective" and report["culprits"] == [1]
    dog, clock = make()  # slow steps: k x the median, not the floor
    check(dog, stuck, median=3.0)
    clock.t = 14.0
    assert check(dog, {0: beat(0, clock=clock), 1: beat(1, phase="forward", entered=9, completed=9, clock=clock)},
                 median=3.0) is None
    clock.t = 15.5
    assert check(dog, {0: beat(0, clock=clock), 1: beat(1, phase="forward", entered=9, completed=9, clock=clock)},
                 median=3.0)["early"]


def test_a_slow_data_read_or_checkpoint_waits_for_the_fixed_threshold():
    for phase in ("data", "checkpoint", "eval"):
        dog, clock = make()
        check(dog, {0: beat(0, clock=clock), 1: beat(1, phase=phase, entered=9, completed=9, clock=clock)})
        clock.t = 30.0
        assert check(dog, {0: beat(0, clock=clock), 1: beat(1, phase=phase, entered=9, completed=9, clock=clock)}) is None
        clock.t = 45.5
        report = check(dog, {0: beat(0, clock=clock), 1: beat(1, phase=phase, entered=9, completed=9, clock=clock)})
        assert report["early"] is False and report["culprits"] == [1]


def test_start_up_and_evidence_off_use_the_fixed_thresholds_only():
    dog, clock = make()
    starting = {0: beat(0, step=-1, progress=0, entered=0, completed=0, clock=clock),
                1: beat(1, step=-1, progress=0, entered=0, completed=0, age=100, clock=clock)}
    check(dog, starting)
    clock.t = 100.0
    assert check(dog, starting) is None  # before the first step: hang.first_step_timeout_s (300 s)
    dog, clock = make(evidence_factor=0)
    check(dog, {0: beat(0, clock=clock), 1: beat(1, clock=clock)})
    clock.t = 30.0
    assert check(dog, {0: beat(0, clock=clock), 1: beat(1, age=30, clock=clock)}) is None


def test_progress_resets_the_clock():
    dog, clock = make()
    check(dog, {0: beat(0, clock=clock), 1: beat(1, clock=clock)})
    clock.t = 40.0
    assert check(dog, {0: beat(0, progress=11, clock=clock), 1: beat(1, progress=11, clock=clock)}) is None
    clock.t = 80.0
    assert check(dog, {0: beat(0, progress=11, clock=clock), 1: beat(1, progress=11, clock=clock)}) is None
    clock.t = 86.0
    assert check(dog, {0: beat(0, progress=11, clock=clock), 1: beat(1, progress=11, clock=clock)}) is not None


# --- the kernel's word on a late rank's process (procstate.py), through a fake probe ---------


class FakeProbe:
    """Answers what the test says the kernel shows; records who was asked for."""

    def __init__(self):
        self.asked: list[tuple[str, dict]] = []
        self.queued: dict[int, list[dict]] = {}

    def request(self, node, pids):
        self.asked.append((node, dict(pids)))

    def answers(self):
        got, self.queued = self.queued, {}
        return got

    def busy(self):
        return bool(self.queued)

    def reset(self):
        self.queued = {}


def make_probed(**kw):
    dog, clock = make(**kw)
    dog.probe = FakeProbe()
    return dog, clock, dog.probe


def look(state, at, pid=4242, wchan=None):
    return {"pid": pid, "state": state, "wchan": wchan, "at": at}


def pbeat(rank, *, clock, age=0.0, **kw):
    return {**beat(rank, clock=clock, age=age, **kw), "pid": 4240 + rank}


def freeze_rank_1(dog, clock, probe, states, *, gap=0.5):
    """Progress at t=0, then rank 1's beats stop; at t=2.5 it is late and looked at; the looks
    (`states`, `gap` apart, after its last beat) arrive by the next check. Returns that check's report."""
    check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, clock=clock)})
    clock.t = 2.5
    assert check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=2.5, clock=clock)}) is None
    assert probe.asked == [("node-b", {1: 4241})]  # only the late rank, on its node, by its pid
    assert dog.next_look_s(2.0) == 0.25  # the controller looks fast while it is being read
    probe.queued = {1: [look(s, WALL + 2.5 + i * gap, pid=4241, wchan="do_signal_stop" if s == "T" else None)
                        for i, s in enumerate(states)]}
    clock.t = 3.1
    return check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=3.1, clock=clock)})


def test_a_process_seen_stopped_twice_is_named_at_once():
    dog, clock, probe = make_probed()
    report = freeze_rank_1(dog, clock, probe, ["T", "T"])
    assert report is not None and report["early"] and report["verdict"] == "stopped"
    assert report["culprits"] == [1] and report["culprit_nodes"] == ["node-b"]
    assert "rank 1 on node node-b" in report["message"] and "pid 4241" in report["message"]
    assert "process stopped (state T: SIGSTOP or job control)" in report["message"]
    assert "heartbeats stopped (rank 1: 3.1s ago)" in report["reason"]
    assert report["ranks"][1]["process"]["state"] == "T" and "process" not in report["ranks"][0]
    assert report["stalled_s"] < 5.0  # long before the stale-heartbeat rule (3 beats + 2 s)


def test_one_look_or_a_tracing_stop_is_no_proof():
    for states, gap in ((["T"], 0.5), (["T", "T"], 0.1), (["t", "t"], 0.5), (["T", "S"], 0.5), (["S", "R"], 0.5)):
        dog, clock, probe = make_probed()
        assert freeze_rank_1(dog, clock, probe, states, gap=gap) is None, states
        clock.t = 4.0  # the old rules are unchanged: heartbeats stale after 3 beats + 2 s
        assert check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=4.0, clock=clock)}) is None, states
        clock.t = 5.5
        report = check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=5.5, clock=clock)})
        assert report["verdict"] == "stopped" and "a frozen process or a lost host" in report["reason"], states


def test_looks_older_than_the_last_heartbeat_prove_nothing():
    dog, clock, probe = make_probed()
    check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, clock=clock)})
    clock.t = 2.5
    check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=2.5, clock=clock)})
    probe.queued = {1: [look("T", WALL - 1.0, pid=4241), look("T", WALL - 0.4, pid=4241)]}  # before its beat at t=0
    clock.t = 3.1
    assert check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=3.1, clock=clock)}) is None


def test_a_stuck_kernel_wait_is_not_named_early_but_is_in_the_report():
    dog, clock, probe = make_probed()
    assert freeze_rank_1(dog, clock, probe, ["D", "D"]) is None
    clock.t = 5.5
    report = check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=5.5, clock=clock)})
    assert report["verdict"] == "stopped" and report["culprits"] == [1]
    assert report["ranks"][1]["process"]["state"] == "D"
    assert "rank 1: process in uninterruptible sleep (state D" in report["reason"]


def test_a_gone_process_is_said_so():
    dog, clock, probe = make_probed()
    assert freeze_rank_1(dog, clock, probe, ["gone"]) is None
    clock.t = 5.5
    report = check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=5.5, clock=clock)})
    assert "rank 1: process gone (no /proc entry), pid 4241" in report["message"]


def test_late_beats_from_a_busy_host_are_looked_at_but_never_named_early():
    """Both ranks' beats arrive 3 s late (a loaded host) while steps go on: a look, no report."""
    dog, clock, probe = make_probed()
    for t in range(1, 20):
        clock.t = float(t)
        beats = {0: pbeat(0, progress=10 + t, clock=clock), 1: pbeat(1, progress=10 + t, age=3.0, clock=clock)}
        probe.queued = {1: [look("R", WALL + t - 0.2, pid=4241)]}
        assert check(dog, beats) is None
    assert probe.asked and all(pids == {1: 4241} for _, pids in probe.asked)


def test_no_look_when_every_beat_is_late_and_none_without_a_pid():
    dog, clock, probe = make_probed()
    check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, clock=clock)})
    clock.t = 3.0  # everyone late: the monitor or the driver is slow, not a rank
    check(dog, {0: pbeat(0, age=3.0, clock=clock), 1: pbeat(1, age=3.0, clock=clock)})
    assert probe.asked == [] and dog.next_look_s(2.0) == 2.0
    dog, clock, probe = make_probed()
    check(dog, {0: beat(0, clock=clock), 1: beat(1, clock=clock)})  # beats without a pid (an old rank)
    clock.t = 3.0
    check(dog, {0: beat(0, clock=clock), 1: beat(1, age=3.0, clock=clock)})
    assert probe.asked == []


def test_the_next_look_is_when_a_beat_would_turn_late():
    dog, clock, probe = make_probed()
    check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=0.6, clock=clock)})
    assert abs(dog.next_look_s(2.0) - (1.5 - 0.6 + 0.05)) < 1e-6  # rank 1 turns late 0.9 s from now
    assert dog.next_look_s(0.5) == 0.5  # never later than the normal tick
    check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, age=1.45, clock=clock)})
    assert dog.next_look_s(2.0) == 0.25  # never sooner than the fast look


def test_a_stalled_group_has_every_process_looked_at():
    """Ranks all beating but stuck (e.g. one in the kernel, its heartbeat thread still alive):
    after 3 beats + 2 s without progress every rank is read, and the report carries what was seen."""
    dog, clock, probe = make_probed()
    stuck = {0: pbeat(0, clock=clock), 1: pbeat(1, phase="data", entered=9, completed=9, clock=clock)}
    check(dog, stuck)
    clock.t = 5.5
    check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, phase="data", entered=9, completed=9, clock=clock)})
    assert sorted(r for _, pids in probe.asked for r in pids) == [0, 1]
    clock.t = 45.5  # the looks keep coming during the stall; the latest arrive now
    probe.queued = {1: [look("D", WALL + 44.5, pid=4241, wchan="nv_wait"), look("D", WALL + 45.0, pid=4241, wchan="nv_wait")],
                    0: [look("S", WALL + 44.5, pid=4240)]}
    report = check(dog, {0: pbeat(0, clock=clock), 1: pbeat(1, phase="data", entered=9, completed=9, clock=clock)})
    assert report["verdict"] == "missing_collective" and report["culprits"] == [1] and not report["early"]
    assert "state D in nv_wait" in report["reason"]


def sbeat(rank, *, clock, **kw):
    """A script rank's beat: its worker (pid 4240+rank) beats for the script (pid 5000+rank)."""
    return {**beat(rank, clock=clock, **kw), "pid": 5000 + rank, "beat_pid": 4240 + rank}


def test_a_stopped_script_whose_worker_still_beats_is_named_once_the_group_stalls():
    dog, clock, probe = make_probed()
    check(dog, {0: sbeat(0, clock=clock), 1: sbeat(1, clock=clock)})
    clock.t = 4.0  # fresh beats, no progress: too soon to look at anyone
    assert check(dog, {0: sbeat(0, clock=clock), 1: sbeat(1, clock=clock)}) is None and probe.asked == []
    clock.t = 5.5  # 3 beats + 2 s without progress: every rank's script is looked at, not its worker
    assert check(dog, {0: sbeat(0, clock=clock), 1: sbeat(1, clock=clock)}) is None
    assert sorted((r, pid) for _, pids in probe.asked for r, pid in pids.items()) == [(0, 5000), (1, 5001)]
    # the worker's own process stopped proves nothing about the script; the script's does
    probe.queued = {0: [look("S", WALL + 5.5, pid=5000)],
                    1: [look("T", WALL + 5.5, pid=4241), look("T", WALL + 6.0, pid=4241)]}
    clock.t = 6.1
    assert check(dog, {0: sbeat(0, clock=clock), 1: sbeat(1, clock=clock)}) is None
    probe.queued = {1: [look("T", WALL + 6.2, pid=5001), look("T", WALL + 6.7, pid=5001)]}
    clock.t = 6.8
    report = check(dog, {0: sbeat(0, clock=clock), 1: sbeat(1, clock=clock)})
    assert report is not None and report["early"] and report["verdict"] == "stopped" and report["culprits"] == [1]
    assert "the script of rank(s) 1 made no progress (its worker still beats)" in report["reason"]
    assert "rank 1: process stopped (state T: SIGSTOP or job control), pid 5001" in report["reason"]
    assert "heartbeats stopped" not in report["reason"]
    assert report["stalled_s"] < 10.0  # the fixed threshold (45 s) is not waited for
