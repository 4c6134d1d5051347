"""An unchanged torchrun-style script (entrypoint.script) on a real local Ray cluster: torchrun's
environment, output kept per rank and attempt, restarts that resume from the script's own
snapshot, failures with the script's last words, and a hang found without the script's help."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.conftest import REPO, cli_json, launch_in_background, run_cli, tiny_config

pytestmark = pytest.mark.ray

SCRIPT = str(REPO / "examples" / "torchrun_ddp.py")


def script_config(tmp_path, tiny_data, args, **sections):
    sections.setdefault("fault_tolerance", {"max_restarts": 3, "backoff_s": 0.2})
    return tiny_config(tmp_path, tiny_data, entrypoint={"script": SCRIPT, "args": args}, **sections)


def lines_of(home, run_id, **filters) -> list[dict]:
    args = [f"--{k}={v}" for k, v in filters.items()]
    return cli_json("logs", run_id, *args, home=home)["lines"]


def test_a_script_gets_torchruns_environment_and_its_output_is_kept(tmp_path, home, tiny_data, ray_address):
    cfg = script_config(tmp_path, tiny_data, ["--steps", "8", "--report"])
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[rank 0] step 7 loss" in proc.stdout  # rank 0's lines live
    run_id = cli_json("runs", home=home)[-1]["id"]
    env = json.loads(next(r["line"] for r in lines_of(home, run_id, rank=0) if r["line"].startswith("ENV "))[4:])
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["LOCAL_RANK"] == "0" and env["GROUP_RANK"] == "0" and env["ROLE_RANK"] == "0"
    assert env["MASTER_ADDR"] and int(env["MASTER_PORT"]) > 0
    assert env["TORCHELASTIC_RESTART_COUNT"] == "0" and env["TORCHELASTIC_RUN_ID"] == run_id
    assert env["TORCHELASTIC_MAX_RESTARTS"] == "3"
    for rank in (0, 1):
        steps = [r["line"] for r in lines_of(home, run_id, rank=rank) if r["line"].startswith("step ")]
        assert len(steps) == 8 and steps[-1].startswith("step 7 ")
    pts = cli_json("metrics", run_id, "--key", "train/loss", "--rank", "1", home=home)["points"]
    assert [p["step"] for p in pts] == list(range(8))  # worker.log reached tracking
    text = run_cli("logs", run_id, "--rank", "1", home=home, check=True).stdout
    assert "[a0 r1] step 7 loss" in text and "[a0 r0]" not in text


def test_a_killed_rank_restarts_and_the_script_resumes_from_its_snapshot(tmp_path, home, tiny_data, ray_address):
    snap = tmp_path / "snap.pt"
    cfg = script_config(tmp_path, tiny_data, ["--steps", "30", "--snapshot", str(snap), "--sleep", "0.2"])
    proc = launch_in_background(cfg, home=home, address=ray_address)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not snap.exists():
            time.sleep(0.3)
        assert snap.exists(), "no snapshot written"
        run_id = cli_json("runs", home=home)[-1]["id"]
        victim = next(w for w in cli_json("show", run_id, home=home)["meta"]["workers"] if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)  # the rank's worker; its script dies with it
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "RESTART 1/3" in out
    assert "restarting in place" not in out  # a dead worker: the group is replaced
    shown = cli_json("show", run_id, home=home)
    assert victim["pid"] not in {w["pid"] for w in shown["meta"]["workers"]}
    attempts = shown["attempts"]
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    resumed = [r["line"] for r in lines_of(home, run_id, rank=0, attempt=1) if r["line"].startswith("resumed from")]
    assert resumed and int(resumed[0].split()[-1]) >= 5
    assert lines_of(home, run_id, rank=0, attempt=1)[-1]["line"] == "done"


def test_a_failing_script_is_restarted_then_reported_with_its_last_words(tmp_path, home, tiny_data, ray_address):
    cfg = script_config(tmp_path, tiny_data, ["--steps", "10", "--fail-at", "2"],
                        fault_tolerance={"max_restarts": 1, "backoff_s": 0.1})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "torchrun_ddp.py exited with code 3: failing at step 2" in last and "after 1 restart" in last, last
    assert "last lines of rank" in proc.stderr
    assert proc.stdout.count("restarting in place") == 1  # the one restart; then max_restarts=1 gives up
    run_id = cli_json("runs", home=home)[-1]["id"]
    assert [a["status"] for a in cli_json("show", run_id, home=home)["attempts"]] == ["failed", "failed"]


def stall_once(tmp_path, home, tiny_data, ray_address, fault: str, timeout_s: float):
    """A 12-step script whose rank 1 hangs or stops itself at step 6 (`fault`: --hang-at, --stop-at),
    launched to the end; the run restarts once. Returns (its stdout, the run id)."""
    snap = tmp_path / "snap.pt"
    cfg = script_config(tmp_path, tiny_data, ["--steps", "12", "--snapshot", str(snap), fault, "6", "--report"],
                        hang={"timeout_s": timeout_s, "heartbeat_s": 0.5, "node_checks": False})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "STALL" in proc.stdout and "RESTART 1/3" in proc.stdout
    return proc.stdout, cli_json("runs", home=home)[-1]["id"]


def test_a_hung_script_is_found_without_its_help_and_restarted(tmp_path, home, tiny_data, ray_address):
    _, run_id = stall_once(tmp_path, home, tiny_data, ray_address, "--hang-at", timeout_s=5)
    events = cli_json("diagnose", run_id, home=home)["events"]
    assert len(events) == 1, [{k: e.get(k) for k in ("kind", "message", "step", "rank")} for e in events]
    (stall,) = events
    assert stall["step"] == 5  # the last step every rank finished before rank 1 hung
    stacks = stall["flight_recorder"]["stacks"]  # the script's own Python stacks, by py-spy
    assert "torchrun_ddp.py" in stacks["1"], stacks


def test_a_stopped_script_is_named_by_its_process_state_while_its_worker_still_beats(tmp_path, home, tiny_data,
                                                                                    ray_address):
    out, run_id = stall_once(tmp_path, home, tiny_data, ray_address, "--stop-at", timeout_s=120)
    stall = next(line for line in out.splitlines() if line.startswith("STALL"))
    # the kernel's word, not the 120 s threshold: the worker's beats were fresh all along
    assert "the script of rank(s) 1 made no progress (its worker still beats)" in stall, stall
    assert "rank 1: process stopped (state T: SIGSTOP or job control)" in stall, stall
    (d,) = cli_json("diagnose", run_id, home=home)["events"]
    assert (d["verdict"], d["culprits"]) == ("stopped", [1]) and d["evidence"]["1"]["process"]["state"] == "T"
    assert lines_of(home, run_id, rank=0, attempt=1)[-1]["line"] == "done"


def test_launch_script_without_a_config_file(tmp_path, home):
    bad = run_cli("launch", "--workers", "2", home=home, timeout=120)
    assert bad.returncode == 2 and "give a config file, or --script PATH" in bad.stderr
    missing = run_cli("launch", "--script", "nope.py", "--workers", "2", "--", "--steps", "3", home=home, timeout=120)
    assert missing.returncode == 2 and "entrypoint.script: no such file" in missing.stderr


def test_launch_script_runs_it_with_its_arguments(tmp_path, home, ray_address):
    proc = run_cli("launch", "--script", SCRIPT, "--workers", "2", "--address", ray_address, "--", "--steps", "3",
                   home=home, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = cli_json("runs", home=home)[-1]
    assert run["name"] == "torchrun_ddp"
    lines = [r["line"] for r in lines_of(home, run["id"], rank=0)]
    assert lines[-1] == "done" and lines[-2].startswith("step 2 loss ")
