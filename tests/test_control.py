"""The controller's state machine, one transition at a time: no Ray, no store, no clock."""

from __future__ import annotations

import pytest

from common.errors import ResourceError
from orchestrator.config import OnNonFinite
from orchestrator.control import (
    Done,
    EndAttempt,
    Failed,
    Finished,
    FollowUpStall,
    GroupFailed,
    Interrupt,
    Machine,
    NodesChecked,
    RecordRecovery,
    Recovered,
    Reserve,
    Reserved,
    ReserveFailed,
    Reserving,
    Restarting,
    RetireCheckpoints,
    Run,
    Say,
    Started,
    StartGroup,
    Starting,
    StopGroup,
    Stopped,
    Tick,
    Training,
)
from orchestrator.policy import Failure, FailureKind, RestartPolicy


def machine(max_restarts=3, on_nonfinite=OnNonFinite.FAIL, avoid=True) -> Machine:
    return Machine(RestartPolicy(max_restarts=max_restarts, backoff_s=1.0, on_nonfinite=on_nonfinite),
                   avoid_culprit_node=avoid)


def training(m: Machine, run: Run | None = None) -> Training:
    state, _ = m.start(run or Run(attempt=0))
    state, _ = m.step(state, Reserved(2), now=0.0)
    state, _ = m.step(state, Started(None), now=0.0)
    assert isinstance(state, Training)
    return state


def kinds(actions) -> list[str]:
    return [type(a).__name__ for a in actions]


def died(rank=1) -> Failure:
    return Failure(FailureKind.DIED, f"rank {rank} died", rank=rank, node_id="node-b")


def test_a_run_reserves_starts_trains_and_finishes():
    m = machine()
    state, actions = m.start(Run(attempt=0))
    assert isinstance(state, Reserving) and actions == [Reserve(0, None, ())]
    state, actions = m.step(state, Reserved(2), now=1.0)
    assert isinstance(state, Starting) and state.world == 2
    assert actions == [StartGroup(attempt=0, world=2, restore=None, skipped=(), recovering=False)]
    state, actions = m.step(state, Started(None), now=2.0)
    assert isinstance(state, Training) and actions == []
    state, actions = m.step(state, Finished({"steps": 30}), now=3.0)
    assert isinstance(state, Done) and state.summary == {"steps": 30}
    assert actions == [EndAttempt(0, "completed")]


def test_no_resources_fails_the_run_with_the_clusters_error():
    m = machine()
    state, _ = m.start(Run(attempt=0))
    err = ResourceError("cannot reserve 2 workers")
    state, actions = m.step(state, ReserveFailed(err), now=0.0)
    assert isinstance(state, Failed) and state.error is err and actions == []


@pytest.mark.parametrize("where", ["starting", "training"])
def test_a_failed_group_restarts_from_the_latest_checkpoint(where):
    m = machine()
    state, _ = m.start(Run(attempt=0))
    state, _ = m.step(state, Reserved(2), now=0.0)
    if where == "training":
        state, _ = m.step(state, Started(None), now=0.0)
    state, actions = m.step(state, GroupFailed(died()), now=10.0)
    assert isinstance(state, Restarting)
    assert kinds(actions) == ["StopGroup", "EndAttempt", "Say"]
    assert actions[1] == EndAttempt(0, "failed", died())
    assert actions[2].text.startswith("RESTART 1/3: rank 1 died")
    assert state.until == 10.0  # the first restart does not wait
    assert state.run == Run(attempt=1, restore="latest", restarts=1, failed_at=10.0, streak=1)
    state, actions = m.step(state, Tick(), now=10.0)
    assert isinstance(state, Reserving) and actions == [Reserve(1, "latest", ())]
    state, actions = m.step(state, Reserved(2), now=11.0)
    assert actions == [StartGroup(attempt=1, world=2, restore="latest", skipped=(), recovering=True)]


def test_later_restarts_back_off_and_wait_for_the_clock():
    m = machine()
    state = training(m, Run(attempt=3, restarts=2, restore="latest", streak=2))  # two failed without recovering
    state, _ = m.step(state, GroupFailed(died()), now=100.0)
    assert isinstance(state, Restarting) and state.run.restarts == 3 and state.run.streak == 3
    assert 100.0 + 1.0 <= state.until <= 100.0 + 2.0  # backoff 2 s x jitter 0.5-1.0
    same, actions = m.step(state, Tick(), now=100.5)
    assert same is state and actions == []
    state, actions = m.step(state, Tick(), now=state.until)
    assert isinstance(state, Reserving) and kinds(actions) == ["Reserve"]


def test_restart_budget_exhausted_fails_and_says_so():
    m = machine(max_restarts=1)
    state = training(m, Run(attempt=1, restarts=1, restore="latest"))
    state, actions = m.step(state, GroupFailed(died()), now=5.0)
    assert isinstance(state, Failed) and state.failure == died()
    assert state.message == "rank 1 died (after 1 restart; fault_tolerance.max_restarts=1)"
    assert kinds(actions) == ["StopGroup", "EndAttempt"]


def test_a_user_error_is_never_retried():
    m = machine(max_restarts=5)
    state = training(m)
    bad = Failure(FailureKind.USER_ERROR, "rank 0 failed during training: DataError: shard missing", rank=0)
    state, _ = m.step(state, GroupFailed(bad), now=0.0)
    assert isinstance(state, Failed) and state.message == bad.message


def test_non_finite_loss_fails_or_rolls_back_skipping_the_batch():
    nan = Failure(FailureKind.NON_FINITE, "train/loss is nan at step 7", rank=0, data={"batch": 7, "value": "nan"})
    state, _ = machine().step(training(machine()), GroupFailed(nan), now=0.0)
    assert isinstance(state, Failed)
    m = machine(on_nonfinite=OnNonFinite.ROLLBACK)
    state, actions = m.step(training(m), GroupFailed(nan), now=0.0)
    assert isinstance(state, Restarting) and state.run.skipped == (7,)
    assert any(isinstance(a, Say) and "skipping global batch 7" in a.text for a in actions)
    state, _ = m.step(state, Tick(), now=0.0)
    _, actions = m.step(state, Reserved(2), now=0.0)
    assert actions[0].skipped == (7,)


def test_a_resize_is_planned_not_counted_and_not_delayed():
    m = machine(max_restarts=0)  # no budget at all: a resize is still fine
    state = training(m, Run(attempt=2, restarts=0, restore="latest"))
    grow = Failure(FailureKind.RESIZE, "regrowing from 1 to 2 workers at the checkpoint of step 20", step=20)
    state, actions = m.step(state, GroupFailed(grow), now=50.0)
    assert isinstance(state, Restarting) and state.until == 50.0 and state.run.restarts == 0
    assert actions[1] == EndAttempt(2, "resized", grow)
    assert actions[-1] == Say("RESIZE: regrowing from 1 to 2 workers at the checkpoint of step 20")


def test_a_straggler_replacement_counts_and_avoids_its_node():
    m = machine()
    state = training(m)
    slow = Failure(FailureKind.STRAGGLER, "replacing straggler rank 1", rank=1, node_id="node-b", step=40)
    state, actions = m.step(state, GroupFailed(slow), now=0.0)
    assert isinstance(state, Restarting) and state.run.restarts == 1 and state.run.avoid_nodes == ("node-b",)
    assert actions[1].status == "replaced"


def hang(culprit_nodes) -> Failure:
    return Failure(FailureKind.HANG, "stall", rank=1 if culprit_nodes else None,
                   data={"verdict": "stopped" if culprit_nodes else "undecided", "culprits": [1] if culprit_nodes else [],
                         "culprit_nodes": culprit_nodes})


def test_a_stall_with_a_culprit_node_follows_up_and_restarts_away_from_it():
    m = machine()
    state, actions = m.step(training(m), GroupFailed(hang(["node-b"])), now=0.0)
    assert kinds(actions)[:3] == ["StopGroup", "EndAttempt", "FollowUpStall"]
    assert state.run.avoid_nodes == ("node-b",)
    state, _ = m.step(state, Tick(), now=0.0)
    assert state == Reserving(state.run)
    _, actions = m.start(state.run)
    assert actions == [Reserve(1, "latest", ("node-b",))]


def test_a_stall_culprit_whose_checks_pass_is_let_back_once():
    """Avoided for one stall, a node that passes its checks is placed on again; a second stall
    there, or an avoidance for anything else, keeps it out for the run."""
    m = machine()
    state, _ = m.step(training(m), GroupFailed(hang(["node-b"])), now=0.0)
    assert state.run.avoid_nodes == ("node-b",) and state.run.on_probation == ("node-b",)
    state, _ = m.step(state, Tick(), now=0.0)
    state, _ = m.step(state, Reserved(2), now=0.0)
    state, _ = m.step(state, Started(10), now=0.0)
    same, actions = m.step(state, NodesChecked(("node-x",)), now=0.0)  # not on probation: nothing changes
    assert same == state and actions == []
    state, actions = m.step(state, NodesChecked(("node-b",)), now=0.0)
    assert isinstance(state, Training) and state.run.avoid_nodes == () and state.run.let_back == ("node-b",)
    assert "node node-b passed its checks" in actions[0].text
    state, _ = m.step(state, GroupFailed(hang(["node-b"])), now=1.0)  # a second stall there
    assert state.run.avoid_nodes == ("node-b",) and state.run.on_probation == ()
    state, actions = m.step(state, NodesChecked(("node-b",)), now=1.0)
    assert state.run.avoid_nodes == ("node-b",) and actions == []


def test_a_node_stalling_again_before_its_checks_or_avoided_for_more_stays_out():
    m = machine()
    state, _ = m.step(training(m), GroupFailed(hang(["node-b", "node-c"])), now=0.0)
    run = state.run
    assert run.on_probation == ("node-b", "node-c")
    state = training(m, run)
    state, _ = m.step(state, GroupFailed(hang(["node-b"])), now=1.0)  # again, its first checks not back yet
    assert state.run.on_probation == ("node-c",)
    state = training(m, state.run)
    slow = Failure(FailureKind.STRAGGLER, "replacing straggler rank 0", rank=0, node_id="node-c", step=40)
    state, _ = m.step(state, GroupFailed(slow), now=2.0)
    assert state.run.on_probation == () and state.run.avoid_nodes == ("node-b", "node-c")
    state, actions = m.step(state, NodesChecked(("node-b", "node-c")), now=2.0)  # in Restarting too
    assert isinstance(state, Restarting) and state.run.avoid_nodes == ("node-b", "node-c") and actions == []


def test_a_stall_without_a_culprit_or_with_avoidance_off_keeps_every_node():
    m = machine()
    state, actions = m.step(training(m), GroupFailed(hang([])), now=0.0)
    assert FollowUpStall() in actions and state.run.avoid_nodes == ()
    m = machine(avoid=False)
    state, _ = m.step(training(m), GroupFailed(hang(["node-b"])), now=0.0)
    assert state.run.avoid_nodes == ()


def test_recovery_time_is_recorded_once():
    m = machine()
    state, _ = m.step(training(m), GroupFailed(died()), now=10.0)
    state, _ = m.step(state, Tick(), now=10.0)
    state, _ = m.step(state, Reserved(2), now=12.0)
    state, _ = m.step(state, Started(30), now=14.0)
    state, actions = m.step(state, Recovered(30), now=17.5)
    assert actions[0] == RecordRecovery(1, 7.5) and "recovered: step 31 done 7.5s after the failure" in actions[1].text
    assert state.run.failed_at is None
    same, actions = m.step(state, Recovered(31), now=18.0)
    assert same == state and actions == []


@pytest.mark.parametrize("where", ["reserving", "starting", "training", "restarting"])
def test_sigterm_or_ctrl_c_stops_in_every_state(where):
    m = machine()
    state, _ = m.start(Run(attempt=0))
    if where != "reserving":
        state, _ = m.step(state, Reserved(2), now=0.0)
    if where in ("training", "restarting"):
        state, _ = m.step(state, Started(None), now=0.0)
    if where == "restarting":
        state, _ = m.step(state, GroupFailed(died()), now=0.0)
    state, actions = m.step(state, Interrupt(), now=1.0)
    assert isinstance(state, Stopped)
    if where in ("starting", "training"):
        assert actions == [StopGroup(), EndAttempt(0, "interrupted")]
    else:
        assert actions == []


def test_unexpected_events_and_final_states_are_refused():
    m = machine()
    state, _ = m.start(Run(attempt=0))
    with pytest.raises(ValueError, match="Finished is not expected in Reserving"):
        m.step(state, Finished({}), now=0.0)
    done, _ = m.step(training(m), Finished({}), now=0.0)
    with pytest.raises(ValueError, match="Done is final"):
        m.step(done, Tick(), now=0.0)


def test_corruption_retires_later_checkpoints_and_restarts_before_it_without_the_suspects():
    m = machine()
    bad = Failure(FailureKind.SDC, "replicas disagree after step 30", rank=2, node_id="node-c",
                  data={"step": 30, "suspects": [2], "suspect_nodes": ["node-c"], "last_good": 20})
    state, actions = m.step(training(m), GroupFailed(bad), now=0.0)
    assert RetireCheckpoints(20, bad.message) in actions
    assert state.run.avoid_nodes == ("node-c",) and state.run.restore_at_most == 20
    state, _ = m.step(state, Tick(), now=0.0)
    _, actions = m.step(state, Reserved(3), now=0.0)
    assert actions[0].restore == "latest" and actions[0].restore_at_most == 20


def test_a_recovery_resets_the_backoff_but_not_the_budget():
    """Failures a minute apart, each recovered, are not a crash loop: none of them waits."""
    m = machine(max_restarts=5)
    state = training(m)
    for n in range(1, 4):
        state, _ = m.step(state, GroupFailed(died()), now=100.0 * n)
        assert isinstance(state, Restarting) and state.until == 100.0 * n  # no wait
        assert state.run.restarts == n and state.run.streak == 1
        state, _ = m.step(state, Tick(), now=100.0 * n)
        state, _ = m.step(state, Reserved(2), now=100.0 * n)
        state, _ = m.step(state, Started(None), now=100.0 * n)
        state, actions = m.step(state, Recovered(step=10 * n), now=100.0 * n + 5)
        assert kinds(actions) == ["RecordRecovery", "Say"] and state.run.streak == 0
    state, _ = m.step(state, GroupFailed(died()), now=500.0)
    state, _ = m.step(state, Tick(), now=500.0)
    state, _ = m.step(state, Reserved(2), now=500.0)
    state, _ = m.step(state, GroupFailed(died()), now=501.0)  # failed again before recovering
    assert state.run.streak == 2 and 501.0 + 0.5 <= state.until <= 501.0 + 1.0
