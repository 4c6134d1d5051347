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
