"""bench/goodput.py in small: a SIGKILLed rank and a frozen (SIGSTOPped) rank on a short run,
against the same run without faults. The invariants of the benchmark, not its timings: every
fault recovered (the freeze by our hang watchdog, not by the bench's bound), the final loss and
weights equal the fault-free run's bit for bit, and no fault loses more than what one checkpoint
in flight can (2 intervals)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.ray

CKPT_EVERY = 5
STEPS = 80


@pytest.fixture
def goodput():
    from bench import goodput

    return goodput


def test_kill_and_freeze_recover_bit_exact(tmp_path, tiny_data, ray_address, goodput):
    args = goodput.parse_args([
        "--steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY), "--model", "tiny",
        "--pause-s", "0.1",  # ~0.15 s a step: the faults land mid-run on a quiet machine too
        "--fault-every-s", "5", "--min-gap-s", "3", "--plan", "kill,stop", "--max-faults", "2",
        # the hang settings the suite uses on a busy machine (tests/test_hang.py); metrics flushed often
        "--ours-set", "hang.heartbeat_s=2", "--ours-set", "hang.timeout_s=15",
        "--ours-set", "telemetry.flush_every_s=0.2", "--hang-bound-s", "300",
        "--ours-set", "hang.node_checks=false",  # tests/test_hang.py covers them; here they only cost time
        "--max-restarts", "4",  # a run that keeps failing ends soon, with its error
    ])
    args.run_timeout = 600  # generous: a busy machine is slow
    common = dict(data_uri=tiny_data, tmp=tmp_path, address=ray_address, cluster=None, steps=STEPS)
    with ThreadPoolExecutor(2) as pool:  # side by side on the session cluster's 4 CPUs: half the time
        ref = pool.submit(goodput.run_ours, "ours_reference", args, **common, kinds=[])
        faulted = goodput.run_ours("ours", args, **common, kinds=["kill", "stop"])
        reference = ref.result()
    for run in (reference, faulted):
        assert "run_error" not in run and "error" not in run, run

    faults = faulted["faults"]
    assert [f["kind"] for f in faults] == ["kill", "stop"], faults
    assert all(f["recovered"] for f in faults), faults
    stop = faults[1]
    assert not stop["bounded"] and not stop["left_frozen"], stop  # our watchdog ended the freeze
    causes = [a["cause"] for a in faulted["attempts"]]
    assert causes == ["died", "hang", None], faulted["attempts"]

    same = goodput.bit_exact(faulted, reference)
    assert same["final_loss"] is not None and same["final_loss_equal"], same
    assert same["final_weights_equal"] and same["every_step_loss_equal"], same

    lost = [f["steps_lost"] for f in faults]
    assert all(x is not None and 0 <= x <= 2 * CKPT_EVERY for x in lost), lost
    # the redone steps in the step log are exactly what the two faults lost
    assert faulted["steps_lost"] == sum(lost), (faulted["steps_lost"], lost)
    assert reference["steps_lost"] == 0 and reference["step_executions"] == STEPS
    # every gap of the fault-free run is itemised: after a checkpoint's step or a plain one
    gaps = reference["between_steps"]
    assert gaps["checkpoint"]["n"] == STEPS // CKPT_EVERY - 1, gaps
    assert gaps["checkpoint"]["n"] + gaps["plain"]["n"] == STEPS - 1, gaps
    assert 0 < faulted["effective_training_time"] <= 1
    assert faulted["productive_s"] > 0 and faulted["train_window_s"] > faulted["productive_s"]


def proc(rank: int, pid: int, start: float, steps: list[tuple[int, float, float]]) -> dict:
    """A step log as bench.recovery.read_logs gives it: [(step, begin, end)] in."""
    return {"rank": rank, "pid": pid, "start": start, "steps": [(s, end) for s, _, end in steps],
            "begins": [b for _, b, _ in steps]}


def test_a_step_rank_0_finishes_after_its_peer_froze_counts_as_lost(goodput):
    # rank 1 froze at t=6 in step 21; rank 0 still finished step 21 (at 6.5); the new group resumes at 20
    old = [proc(0, 10, 0.0, [(20, 4.0, 5.0), (21, 5.2, 6.5)]), proc(1, 11, 0.0, [(20, 4.0, 5.0)])]
    new = [proc(0, 20, 8.0, [(20, 8.5, 9.0)]), proc(1, 21, 8.0, [(20, 8.6, 9.1)])]
    fault = goodput.Fault(kind="stop", rank=1, pid=11, at=6.0, group_pids=[10, 11])
    got = goodput.fault_recovery(old + new, fault, next_at=float("inf"))
    assert got["recovered"] and got["after_step"] == 20 and got["resumed_at_step"] == 20, got
    assert got["steps_lost"] == 2, got  # rank 0 redoes 20 and 21: as the run's total counts
    assert got["recovery_s"] == 9.1 - 6.0


def test_time_between_steps_is_summed_by_what_ran_in_it(goodput):
    # gaps 0.1, 0.3, 0.8, 0.4 after steps 0-3; 4 -> 7 is a restart's (the recovery's, not counted)
    steps = [(0, 0.5, 1.0), (1, 1.1, 2.0), (2, 2.3, 3.0), (3, 3.8, 4.0), (4, 4.4, 5.0), (7, 9.0, 9.5)]
    gaps = goodput.between_steps([proc(0, 1, 0.0, steps), proc(1, 2, 0.0, steps)],
                                 {"checkpoint": 4, "snapshot": 2})  # a checkpoint's step is named as such
    assert gaps["plain"]["n"] == 2 and gaps["plain"]["total_s"] == 0.9, gaps  # after 0 and 2; rank 0's only
    assert gaps["snapshot"] == {"n": 1, "total_s": 0.3, "median_ms": 300.0, "max_ms": 300.0}, gaps  # after 1
    assert gaps["checkpoint"] == {"n": 1, "total_s": 0.4, "median_ms": 400.0, "max_ms": 400.0}, gaps  # after 3


def test_a_recovery_is_split_at_the_driver_s_lines_with_or_without_stages(goodput):
    fault = {"at": 100.0, "recovered": True, "recovery_s": 6.0, "first_forward_s": 5.0, "old_group_gone_s": 0.3}
    for seconds in ("4.1s", "4.1s: workers 3.9, storage check 0.0, process group 0.2"):
        lines = [(100.4, "RESTART 1/3: rank 0 died during training; restoring the latest checkpoint in 0.0s"),
                 (104.6, f"rendezvous done: 2 ranks on 2 node(s), backend gloo, master 127.0.0.1:1 ({seconds}), "
                         "resuming at step 88 from in-memory snapshots; 2 of them warm standby workers")]
        phases = goodput.our_phases(lines, fault, next_at=200.0)
        assert phases["rendezvous"] == 4.1 and phases["detection"] == 0.3, phases
        assert phases["backoff_and_reservation"] == 0.1 and phases["restore"] == 0.4, phases
