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
