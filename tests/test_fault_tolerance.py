"""Fault tolerance on a real local Ray cluster: workers SIGKILLed at random steps recover on their
own and end bit for bit where an uninterrupted run ends; resume and fork through the CLI."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest
import torch

from tests.conftest import cli_json, launch_in_background, run_cli, tiny_config

pytestmark = pytest.mark.ray

FT = {"max_restarts": 5, "backoff_s": 0.2}


def final_weights(home, run_id):
    from checkpointing.loader import load_latest

    report = cli_json("checkpoints", run_id, home=home)
    loaded = load_latest(report["uri"])
    assert loaded is not None
    return loaded.step, loaded.model


def losses(home, run_id, rank=0):
    pts = cli_json("metrics", run_id, "--key", "train/loss", "--rank", str(rank), home=home)["points"]
    return [(p["step"], p["value"]) for p in pts]


def wait_for_step(home, run_id, step, deadline):
    """Until rank 0's loss of `step` is stored. Read in this process, not through the CLI: a CLI
    call takes seconds on a busy machine, and a short run can end in that time."""
    from orchestrator.store import Store

    store = None
    try:
        while time.monotonic() < deadline:
            if store is None and (home / "store.db").exists():
                store = Store(home, create=False)
            pts = store.series(run_id, "train/loss", rank=0) if store is not None else []
            if pts and pts[-1]["step"] >= step:
                return
            time.sleep(0.2)
    finally:
        if store is not None:
            store.close()
    raise AssertionError(f"run never reached step {step}")


def wait_for_actor(name_part: str, deadline: float) -> None:
    """Until a named actor of the test cluster has `name_part` in its name."""
    import ray

    while time.monotonic() < deadline:
        if any(name_part in a["name"] for a in ray.util.list_named_actors(all_namespaces=True)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no actor named *{name_part}* appeared")


def run_named(home, name: str, deadline: float) -> str:
    """The id of the run called `name`, once it is recorded."""
    while time.monotonic() < deadline:
        if (home / "store.db").exists():
            ids = [r["id"] for r in cli_json("runs", home=home) if r["name"] == name]
            if ids:
                return ids[0]
        time.sleep(0.3)
    raise AssertionError(f"run {name} was never recorded")


def kill_at_steps(home, run_id, steps, rng, deadline, before_kill=None) -> list[tuple[int, int]]:
    """SIGKILL a random worker of the current attempt once the run reaches each of `steps` (and
    before_kill(i), if given, has returned for the i-th kill); returns (step, rank) of each kill."""
    kills, old_pids = [], set()
    for i, kill_step in enumerate(steps):
        wait_for_step(home, run_id, kill_step, deadline)
        if before_kill is not None:
            before_kill(i)
        while time.monotonic() < deadline:  # the workers of the current attempt, not the killed one's
            workers = cli_json("show", run_id, home=home)["meta"]["workers"]
            if not old_pids & {w["pid"] for w in workers}:
                break
            time.sleep(0.3)
        victim = rng.choice(workers)
        os.kill(victim["pid"], signal.SIGKILL)  # a worker process our test cluster started
        old_pids |= {w["pid"] for w in workers}
        kills.append((kill_step, victim["rank"]))
    return kills


def launch_killed_twice(cfg, *extra: str, home, address: str, steps: int, margin: int, seed: int):
    """Launch `cfg` in the background as the store's second run, SIGKILL a random worker at two
    random steps in [margin, steps // 2 + margin), and wait for the launch to end. Returns
    (run id, returncode, stdout, stderr). The second kill leaves half the run or more after it:
    the run must not end before the kill lands, however slow the machine is to notice the step."""
    proc = launch_in_background(cfg, *extra, home=home, address=address)
    rng = random.Random(seed)
    try:
        deadline = time.monotonic() + 600  # generous: a busy machine is slow
        while time.monotonic() < deadline and len(cli_json("runs", home=home)) < 2:
            time.sleep(0.2)
        run_id = cli_json("runs", home=home)[-1]["id"]
        kill_at_steps(home, run_id, sorted(rng.sample(range(margin, steps // 2 + margin), 2)), rng, deadline)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_id, proc.returncode, out, err


class Lines:
    """A child's output lines, read as they come (a thread), for a test that waits for one."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, count: int, deadline: float) -> None:
        while sum(text in line for line in self.lines) < count:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError(f"never {count} lines with {text!r}:\n" + "".join(self.lines))
            time.sleep(0.2)

    def text(self) -> str:
        self.thread.join(timeout=60)
        return "".join(self.lines)


def test_sigkilled_workers_recover_bit_exact_on_standby_workers(tmp_path, home, tiny_data, ray_address):
    """With fault_tolerance.standby_workers, each restart's ranks run in spare workers warmed while
    the previous group trained, or still warming up and then boosted (the default path's kills:
    test_function_mode, test_gpt_on_ctx)."""
    steps = 400
    released = tmp_path / "released"
    # paced (0.25 s a step, numerics untouched) until the kills are done, so a run does not end
    # before the spares are warm and the kill lands: a quiet machine runs this model at 50 steps/s
    model = {"factory": "tests.user_models:slow_gpt",
             "kwargs": {"pause_s": 0.25, "dropout": 0.1, "release_path": str(released)}}
    sections = dict(train={"max_steps": steps, "eval_every": 0}, checkpoint={"every_steps": 5})
    (tmp_path / "chaos").mkdir()
    (tmp_path / "reference").mkdir()
    # heartbeats every 2 s (a rank counts as stopped after 8 s, not 5): with the reference beside it on
    # a busy machine, late beats must not add a stall restart to the two kills
    cfg = tiny_config(tmp_path / "chaos", tiny_data, run={"name": "chaos", "seed": 1}, model=model,
                      hang={"heartbeat_s": 2.0}, fault_tolerance={**FT, "standby_workers": True}, **sections)
    # the reference: the same seed and world size, never interrupted (nor paced), side by side
    ref_cfg = tiny_config(tmp_path / "reference", tiny_data, run={"name": "reference", "seed": 1},
                          model={**model, "kwargs": {"pause_s": 0.0, "dropout": 0.1}}, fault_tolerance=FT, **sections)

    ref_home = tmp_path / "reference-home"  # a store of its own: the two drivers never wait on each other's writes
    ref_proc = launch_in_background(ref_cfg, home=ref_home, address=ray_address, stderr=subprocess.STDOUT)
    proc = launch_in_background(cfg, home=home, address=ray_address, stderr=subprocess.STDOUT)
    lines = Lines(proc.stdout)
    rng = random.Random(7)
    try:
        deadline = time.monotonic() + 600  # generous: a busy machine is slow
        chaos = run_named(home, "chaos", deadline)
        # the first kill once the spares for it are warm (they start after the group's first step); the
        # second once the next spares have started, so they are usually still warming up
        kill_at_steps(home, chaos, [2, 2], rng, deadline,
                      before_kill=lambda i: lines.wait_for("spare worker(s) warm", 1, deadline) if i == 0
                      else wait_for_actor(":standby3", deadline))
        released.touch()
        proc.wait(timeout=600)
        out, err = lines.text(), ""
        ref_out, _ = ref_proc.communicate(timeout=600)
    finally:
        for p in (proc, ref_proc):
            if p.poll() is None:
                p.kill()
    assert ref_proc.returncode == 0, ref_out
    reference = run_named(ref_home, "reference", deadline)
    assert proc.returncode == 0, out + err
    assert out.count("RESTART") == 2 and "recovered" in out, out
    restarts = [line for line in out.splitlines() if line.startswith("rendezvous done") and "resuming" in line]
    assert len(restarts) == 2, out
    assert all(re.search(r"\(\d+\.\ds: workers [\d.]+, storage check [\d.]+, process group [\d.]+\)", r)
               for r in restarts), out  # where each restart's start went
    assert restarts[0].endswith("; 2 of them warm standby workers"), out  # both ranks
    # taken warm, or (as a rule) still warming up and finished at a rank's priority: bit-exact either way
    assert restarts[1].endswith(("; 2 of them warm standby workers", "still warming up (finishing at full priority)"))

    attempts = cli_json("show", chaos, home=home)
    assert attempts["status"] == "completed"
    # bit-exact: same parameters at the end, same loss at every step
    ref_step, ref_model = final_weights(ref_home, reference)
    got_step, got_model = final_weights(home, chaos)
    assert ref_step == got_step == steps
    assert ref_model.keys() == got_model.keys()
    assert all(torch.equal(ref_model[k], got_model[k]) for k in ref_model)
    assert losses(home, chaos) == losses(ref_home, reference)
    assert losses(home, chaos, rank=1) == losses(ref_home, reference, rank=1)


def test_attempts_recorded_with_cause_rank_and_steps_lost(tmp_path, home, tiny_data, ray_address):
    """A rank that raises on every attempt: restarts are bounded, each attempt is recorded."""
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 40, "eval_every": 0},
                      checkpoint={"every_steps": 2}, fault_tolerance={"max_restarts": 2, "backoff_s": 0.1},
                      model={"factory": "tests.user_models:failing_gpt", "kwargs": {"fail_rank": 1, "fail_call": 12}})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "(after 2 restarts; fault_tolerance.max_restarts=2)" in proc.stderr.strip().splitlines()[-1]
    run = cli_json("runs", home=home)[-1]
    from orchestrator.store import Store

    attempts = Store(home).attempts(run["id"])
    assert [a["status"] for a in attempts] == ["failed"] * 3
    assert all(a["cause"] == "exception" and a["rank"] == 1 for a in attempts), attempts
    # each attempt fails 11 steps after it starts; it resumes from a checkpoint of the one before
    assert attempts[0]["resumed_from_step"] is None and attempts[0]["failed_step"] >= 8
    assert 2 <= attempts[1]["resumed_from_step"] <= 11 and attempts[2]["resumed_from_step"] > attempts[1]["resumed_from_step"]
    assert all(a["steps_lost"] is not None and a["steps_lost"] >= 0 for a in attempts)


def test_resume_extends_a_completed_run(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 12, "eval_every": 0}, checkpoint={"every_steps": 4})
    run_cli("launch", str(cfg), "--address", ray_address, home=home, check=True)
    run_id = cli_json("runs", home=home)[-1]["id"]
    proc = run_cli("resume", run_id, "train.max_steps=20", "--address", ray_address, home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming at step 12" in proc.stdout
    runs = cli_json("runs", home=home)
    assert len(runs) == 1 and runs[0]["status"] == "completed"
    assert [s for s, _ in losses(home, run_id)] == list(range(20))
    assert cli_json("show", run_id, home=home)["config"]["train"]["max_steps"] == 20


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data, ray_address):
    """(home, run id): one completed 12-step run with checkpoints at 4, 8 and 12, which the fork
    and bad-input tests start from (neither changes it)."""
    tmp = tmp_path_factory.mktemp("finished")
    home = tmp / "home"
    cfg = tiny_config(tmp, tiny_data, train={"max_steps": 12, "eval_every": 0}, checkpoint={"every_steps": 4})
    run_cli("launch", str(cfg), "--address", ray_address, home=home, check=True)
    return home, cli_json("runs", home=home)[-1]["id"]


def test_fork_and_fork_of_fork_inherit_history(finished_run, ray_address):
    home, parent = finished_run
    proc = run_cli("fork", parent, "--step", "8", "optim.lr=0.001", "--name", "child", "--address", ray_address,
                   home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    child = [r for r in cli_json("runs", home=home) if r["name"] == "child"][0]
    assert (child["parent"], child["fork_step"]) == (parent, 8)
    parent_losses, child_losses = losses(home, parent), losses(home, child["id"])
    assert [s for s, _ in child_losses] == list(range(12))
    assert child_losses[:8] == parent_losses[:8]  # inherited, not copied
    assert child_losses[8:] != parent_losses[8:]  # its own steps, with its own lr

    proc = run_cli("fork", child["id"], "--step", "12", "train.max_steps=14", "--name", "grandchild",
                   "--address", ray_address, home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    grand = [r for r in cli_json("runs", home=home) if r["name"] == "grandchild"][0]
    assert (grand["parent"], grand["fork_step"]) == (child["id"], 12)
    assert losses(home, grand["id"])[:12] == child_losses
    assert [s for s, _ in losses(home, grand["id"])] == list(range(14))


def test_resume_and_fork_bad_input_is_one_line(finished_run):
    home, run_id = finished_run
    runs_before = cli_json("runs", home=home)
    assert run_id in {r["id"] for r in runs_before}
    cases = [
        (["fork", run_id, "--step", "5"], "no committed checkpoint at step 5 (steps with one: 4, 8, 12)"),
        (["fork", run_id, "--step", "4", "model.d_model=128"], "model.d_model=128 differs from the checkpoint's 64"),
        (["resume", "no-such-run"], "no run 'no-such-run'"),
        (["fork", run_id, "--step", "4", "optim.lrr=1"], "did you mean optim.lr"),
    ]
    for argv, expected in cases:
        proc = run_cli(*argv, home=home)
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, lines)
    assert cli_json("runs", home=home) == runs_before  # nothing was started
