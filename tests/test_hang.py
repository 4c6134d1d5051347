"""Hang diagnosis: attribution rules one case at a time, then real hangs on gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from orchestrator.hang import attribute, stall_threshold_s
from tests.conftest import ORCH, REPO, cli_json, run_cli, tiny_config


def beat(rank, step, phase, entered, completed, t):
    return {"rank": rank, "step": step, "phase": phase, "coll_entered": entered, "coll_completed": completed,
            "time": t}


def test_threshold_is_the_larger_of_timeout_and_k_medians():
    assert stall_threshold_s(60, [0.1, 0.2, 0.3], 10) == 60
    assert stall_threshold_s(5, [1.0, 2.0, 3.0], 10) == 20
    assert stall_threshold_s(5, [], 10) == 5


def test_rank_that_never_entered_the_collective_is_the_culprit():
    now = 100.0
    beats = {0: beat(0, 6, "backward", 15, 14, now), 1: beat(1, 6, "forward", 14, 14, now),
             2: beat(2, 6, "backward", 15, 14, now)}
    r = attribute(beats, now=now, heartbeat_s=1, nodes={0: "n0", 1: "n1", 2: "n0"})
    assert (r["verdict"], r["culprits"], r["culprit_nodes"]) == ("missing_collective", [1], ["n1"])
    assert "never entered collective #15 that rank(s) 0, 2 wait in" in r["reason"] and "rank 1 in forward" in r["reason"]


def test_stopped_heartbeats_win():
    now = 100.0
    beats = {0: beat(0, 6, "backward", 15, 14, now), 1: beat(1, 6, "forward", 14, 14, now - 30)}
    r = attribute(beats, now=now, heartbeat_s=1)
    assert (r["verdict"], r["culprits"]) == ("stopped", [1]) and "30.0s ago" in r["reason"]


def test_rank_stuck_in_data_loading_is_named_with_its_phase():
    now = 100.0
    beats = {0: beat(0, 6, "data", 14, 14, now), 1: beat(1, 6, "data", 14, 14, now)}
    r = attribute(beats, now=now, heartbeat_s=1)
    assert r["verdict"] == "stuck" and r["culprits"] == [0, 1] and "rank 0 in data" in r["reason"]


def test_everyone_waiting_in_the_same_collective_is_undecided():
    now = 100.0
    beats = {0: beat(0, 6, "backward", 15, 14, now), 1: beat(1, 6, "backward", 15, 14, now)}
    r = attribute(beats, now=now, heartbeat_s=1)
    assert r["verdict"] == "undecided" and r["culprits"] == [] and "does not single one out" in r["reason"]


@pytest.mark.ray
def test_rank_stopping_collectives_is_named_in_seconds(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 40, "eval_every": 0},
                      hang={"timeout_s": 6, "heartbeat_s": 0.5}, fault_tolerance={"max_restarts": 0},
                      model={"factory": "tests.user_models:hanging_gpt", "kwargs": {"hang_rank": 1, "hang_call": 8}})
    started = time.monotonic()
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert time.monotonic() - started < 200  # bounded; torch's own gloo timeout here is 300 s
    last = proc.stderr.strip().splitlines()[-1]
    assert "stall: no step completed" in last and "rank 1 on node" in last and "never entered collective" in last
    run_id = cli_json("runs", home=home)[-1]["id"]
    (d,) = cli_json("diagnose", run_id, home=home)["events"]
    assert (d["kind"], d["verdict"], d["culprits"], d["phase"]) == ("stall", "missing_collective", [1], "forward")
    assert d["step"] == 6 and d["action"] == "the run stopped" and len(d["nodes"]) == 1
    assert d["evidence"]["0"]["coll_entered"] == d["evidence"]["1"]["coll_entered"] + 1


@pytest.mark.ray
def test_frozen_rank_is_named_and_the_run_recovers(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 60, "eval_every": 0}, checkpoint={"every_steps": 5},
                      hang={"timeout_s": 6, "heartbeat_s": 0.5}, fault_tolerance={"max_restarts": 1},
                      model={"factory": "tests.user_models:slow_gpt", "kwargs": {"pause_s": 0.05}})
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    proc = subprocess.Popen([*ORCH, "launch", str(cfg), "--address", ray_address], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    frozen = None
    try:
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            runs = cli_json("runs", home=home) if (home / "store.db").exists() else []
            if runs and "train/loss" in cli_json("metrics", runs[0]["id"], home=home)["keys"]:
                pts = cli_json("metrics", runs[0]["id"], "--key", "train/loss", "--rank", "0", home=home)["points"]
                if pts and pts[-1]["step"] >= 12:
                    break
            time.sleep(0.3)
        run_id = runs[0]["id"]
        frozen = next(w for w in cli_json("show", run_id, home=home)["meta"]["workers"] if w["rank"] == 0)["pid"]
        os.kill(frozen, signal.SIGSTOP)  # a worker our test cluster started: frozen, not dead
        out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGCONT)  # in case it was not killed by the controller
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, out
    assert "STALL" in out and "heartbeats stopped" in out and "RESTART 1/1" in out
    (d,) = cli_json("diagnose", run_id, home=home)["events"]
    assert (d["verdict"], d["culprits"]) == ("stopped", [0]) and d["action"].startswith("restarted")


@pytest.mark.ray
def test_slow_rank_is_flagged_as_a_straggler(tmp_path, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 80, "eval_every": 0},
                      model={"factory": "tests.user_models:slow_gpt", "kwargs": {"pause_s": 0.04, "slow_rank": 1}})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALERT warning straggler: rank 1 computes at" in proc.stdout
    run_id = cli_json("runs", home=home)[-1]["id"]
    rows = cli_json("diagnose", run_id, home=home)["events"]
    assert [(r["kind"], r["culprits"]) for r in rows] == [("straggler", [1])]
    scores = {r: cli_json("metrics", run_id, "--key", "health/straggler_score", "--rank", str(r), home=home)["points"]
              for r in (0, 1)}
    assert scores[1][-1]["value"] < 0.75 < scores[0][-1]["value"]
