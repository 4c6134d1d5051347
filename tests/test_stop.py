"""`orchestrator stop RUN` on a real local Ray cluster: the ranks agree on a step, save a final
checkpoint of it and end, the run is `stopped`, and `resume` continues from that checkpoint bit
for bit (the built-in loop; a user's function through ctx.save). A script gets SIGTERM."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import cli_json, launch_in_background, run_cli, tiny_config
from tests.test_fault_tolerance import final_weights, losses, run_named, wait_for_step

pytestmark = pytest.mark.ray


def launch(cfg, home, ray_address, *extra: str) -> subprocess.Popen:
    return launch_in_background(cfg, *extra, home=home, address=ray_address, stderr=subprocess.STDOUT)


def committed(home, run_id) -> list[int]:
    return [c["step"] for c in cli_json("checkpoints", run_id, home=home)["checkpoints"] if c["status"] == "committed"]


def stop_after(home, run_id, proc: subprocess.Popen, step: int, deadline: float) -> str:
    """`orchestrator stop` once the run passed `step`; the launch's output."""
    wait_for_step(home, run_id, step, deadline)
    stop = run_cli("stop", run_id, home=home, timeout=300)
    assert stop.returncode == 0 and f"run {run_id} stopped" in stop.stdout, stop.stdout + stop.stderr
    out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    assert proc.returncode == 0, out
    return out


def test_stop_saves_the_step_it_stopped_at_and_resume_continues_bit_exact(tmp_path, home, tiny_data, ray_address):
    """checkpoint.every_steps=0 (only at the end): the one checkpoint the stopped run has is the
    stop's own. An uninterrupted run of the same config, side by side, is the reference. Only the
    stopped run is paced (the pause touches no numbers), and only until it is stopped: its resume
    runs at full speed."""
    steps = 80
    released = tmp_path / "released"
    sections = dict(train={"max_steps": steps, "eval_every": 0}, checkpoint={"every_steps": 0})
    paced = {"factory": "tests.user_models:slow_gpt", "kwargs": {"pause_s": 0.15, "release_path": str(released)}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    stopped_cfg = tiny_config(tmp_path / "a", tiny_data, run={"name": "stopped", "seed": 1}, model=paced, **sections)
    reference_cfg = tiny_config(tmp_path / "b", tiny_data, run={"name": "reference", "seed": 1},
                                model={**paced, "kwargs": {"pause_s": 0.0}}, **sections)
    deadline = time.monotonic() + 600
    reference_proc = launch(reference_cfg, home, ray_address)
    proc = launch(stopped_cfg, home, ray_address)
    try:
        run_id = run_named(home, "stopped", deadline)
        out = stop_after(home, run_id, proc, 5, deadline)
        released.touch()
        ref_out, _ = reference_proc.communicate(timeout=max(10, deadline - time.monotonic()))
        assert reference_proc.returncode == 0, ref_out
    finally:
        for p in (proc, reference_proc):
            if p.poll() is None:
                p.kill()
    reference = run_named(home, "reference", deadline)

    run = cli_json("show", run_id, home=home)
    assert run["status"] == "stopped", run["status"]
    assert [a["status"] for a in run["attempts"]] == ["stopped"]
    done = [s for s, _ in losses(home, run_id)]
    assert done and done == list(range(len(done))) and len(done) < steps, (done, out)
    for rank in (0, 1):  # every rank ended after the same step
        assert [s for s, _ in losses(home, run_id, rank=rank)] == done
    assert committed(home, run_id) == [len(done)], out  # the final checkpoint: the step it stopped at
    assert f"stopped after step {len(done)}, its checkpoint committed" in out, out

    resumed = run_cli("resume", run_id, home=home)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming at step {len(done)}" in resumed.stdout, resumed.stdout
    assert cli_json("show", run_id, home=home)["status"] == "completed"
    ref_losses = losses(home, reference)
    assert len(ref_losses) == steps
    for rank in (0, 1):
        assert losses(home, run_id, rank=rank) == losses(home, reference, rank=rank)
    ref_step, ref_model = final_weights(home, reference)
    got_step, got_model = final_weights(home, run_id)
    assert ref_step == got_step == steps and ref_model.keys() == got_model.keys()
    assert all(ref_model[k].equal(got_model[k]) for k in ref_model)


def test_a_function_is_stopped_at_a_ctx_save_with_its_checkpoint(tmp_path, home, tiny_data, ray_address):
    steps = 2000
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": steps}, checkpoint={"every_steps": 500},
                      entrypoint={"function": "tests.user_functions:regression", "kwargs": {"pause_s": 0.1}})
    deadline = time.monotonic() + 600
    proc = launch(cfg, home, ray_address)
    try:
        run_id = run_named(home, "tiny", deadline)
        out = stop_after(home, run_id, proc, 3, deadline)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert cli_json("show", run_id, home=home)["status"] == "stopped"
    done = [s for s, _ in losses(home, run_id)]
    assert done and len(done) < 500, done  # stopped before the first scheduled checkpoint ...
    assert committed(home, run_id) == [len(done)], out  # ... with a checkpoint of the step it stopped at
    resumed = run_cli("resume", run_id, "train.max_steps=" + str(len(done) + 5), home=home, timeout=600)
    assert resumed.returncode == 0 and f"resuming at step {len(done)}" in resumed.stdout, resumed.stdout + resumed.stderr
    assert [s for s, _ in losses(home, run_id)] == list(range(len(done) + 5))


SCRIPT = """
import signal, sys, time
def on_term(signum, frame):
    print("SIGTERM at step", step, flush=True)  # where a real script saves its own snapshot
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
for step in range(100000):
    print("step", step, flush=True)
    time.sleep(0.2)
"""


def test_a_script_gets_sigterm_and_the_run_ends_stopped(tmp_path, home, tiny_data, ray_address):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT)
    cfg = tiny_config(tmp_path, tiny_data, entrypoint={"script": str(script)})
    deadline = time.monotonic() + 600
    proc = launch(cfg, home, ray_address)
    try:
        run_id = run_named(home, "tiny", deadline)
        while time.monotonic() < deadline:  # both ranks' scripts are running
            lines = cli_json("logs", run_id, home=home)["lines"]
            if {r["rank"] for r in lines if r["line"].startswith("step")} == {0, 1}:
                break
            time.sleep(0.3)
        stop = run_cli("stop", run_id, home=home, timeout=300)
        assert stop.returncode == 0 and f"run {run_id} stopped" in stop.stdout, stop.stdout + stop.stderr
        out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert cli_json("show", run_id, home=home)["status"] == "stopped"
    lines = cli_json("logs", run_id, home=home)["lines"]
    assert {r["rank"] for r in lines if r["line"].startswith("SIGTERM at step")} == {0, 1}, lines[-10:]
