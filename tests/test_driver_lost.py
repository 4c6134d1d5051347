"""A driver SIGKILLed mid-run: the run shows as `lost` (not `running` forever), and `resume`
takes it over from its latest checkpoint and completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from orchestrator.store import driver_gone
from tests.conftest import cli_json, launch_in_background, run_cli, tiny_config
from tests.test_fault_tolerance import wait_for_step

pytestmark = pytest.mark.ray


def test_a_stale_or_dead_driver_is_judged_lost():
    import socket

    me = socket.gethostname()
    now = time.time()
    assert not driver_gone(me, os.getpid(), now, now)  # alive and beating
    assert not driver_gone(None, None, None, now)  # recorded before drivers beat: no judgement
    assert driver_gone("other-host", 1, now - 61, now)  # silent for longer than LOST_AFTER_S
    assert not driver_gone("other-host", 1, now - 30, now)
    child = subprocess.Popen(["sleep", "60"])
    child.kill()
    child.wait()
    assert driver_gone(me, child.pid, now, now)  # its process is gone from this host


@pytest.mark.parametrize("how", ["resume", "relaunch"])
def test_a_killed_driver_leaves_a_lost_run_that_resume_completes(tmp_path, home, tiny_data, ray_address, how):
    """`resume RUN`, or the same job submitted again with run.resume=auto (the KubeRay RayJob pattern)."""
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 30, "eval_every": 0}, checkpoint={"every_steps": 5},
                      model={"factory": "tests.user_models:slow_gpt", "kwargs": {"pause_s": 0.1}})
    proc = launch_in_background(cfg, home=home, address=ray_address, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not cli_json("runs", home=home):
            time.sleep(0.3)
        run_id = cli_json("runs", home=home)[-1]["id"]
        wait_for_step(home, run_id, 12, deadline)  # past the checkpoint of step 10
        assert cli_json("runs", home=home)[-1]["status"] == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert cli_json("runs", "--status", "lost", home=home)[-1]["id"] == run_id
    if how == "resume":
        done = run_cli("resume", run_id, "--address", ray_address, home=home, timeout=600)
    else:
        done = run_cli("launch", str(cfg), "--resume-if-exists", "--address", ray_address, home=home, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "taking it over" in done.stdout
    assert len(cli_json("runs", home=home)) == 1  # the same run went on: no new one
    run = cli_json("show", run_id, home=home)
    assert run["status"] == "completed"
    attempts = run["attempts"]
    assert attempts[0]["status"] == "lost" and attempts[0]["cause"] == "driver_lost"
    assert attempts[-1]["status"] == "completed" and attempts[-1]["resumed_from_step"] >= 10
    steps = [p["step"] for p in cli_json("metrics", run_id, "--key", "train/loss", home=home)["points"]]
    assert steps and steps[-1] == 29
