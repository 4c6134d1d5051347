"""Detached runs as Ray Jobs on a cluster with a dashboard (a `ray start` head this test starts on
127.0.0.1): launch returns at once, the run is followed from another command, stopped on request,
and the bad cases are one line each."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_json, run_cli, tiny_config

pytestmark = pytest.mark.ray

RAY = str(Path(os.sys.executable).parent / "ray")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job_cluster(tmp_path_factory):
    """A head with the dashboard (the Jobs API) on loopback; stopped by the pids it started."""
    temp = Path("/tmp") / f"orch-jobs-{os.getpid()}"
    dash = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
                           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                           str(dash), "--num-cpus", "3", "--temp-dir", str(temp), "--disable-usage-stats",
                           # the job agent's own ports: other Ray clusters on this machine hold the defaults
                           "--dashboard-agent-listen-port", str(free_port()),
                           "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port())],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        mine = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
        for pid in mine:  # only the processes of the cluster this fixture started (its temp dir in their command)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_detached_run_returns_at_once_and_is_followed_and_stopped(tmp_path, home, tiny_data, job_cluster):
    cfg = tiny_config(tmp_path, tiny_data)
    work = tmp_path / "work"
    work.mkdir()
    (work / "run.yaml").write_text(cfg.read_text())
    (work / "user_models.py").write_text((REPO / "tests" / "user_models.py").read_text())  # shipped with the job
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    sub = subprocess.run([os.sys.executable, "-m", "orchestrator.cli", "launch", "run.yaml", "train.max_steps=20",
                          "--address", job_cluster, "--detach"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert time.monotonic() - t0 < 60  # it does not wait for the run
    run_id = sub.stdout.split("submitted run ")[1].split()[0]
    assert f"/#/jobs/{run_id}" in sub.stdout
    attach = subprocess.run([os.sys.executable, "-m", "orchestrator.cli", "attach", run_id], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert attach.returncode == 0, attach.stdout + attach.stderr
    assert f"run {run_id} completed" in attach.stdout and "step 20 |" in attach.stdout
    # a longer one, stopped on request
    sub = subprocess.run([os.sys.executable, "-m", "orchestrator.cli", "launch", "run.yaml", "train.max_steps=5000",
                          "model.factory=user_models:slow_gpt", "model.kwargs={pause_s: 0.05}",
                          "--address", job_cluster, "--detach"], cwd=work, env={**env, "PYTHONPATH": str(work)},
                         capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    run_id = sub.stdout.split("submitted run ")[1].split()[0]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not cli_json("show", run_id, home=home)["attempts"]:
        time.sleep(1.0)  # the job's driver has started the run
    stop = run_cli("stop", run_id, home=home, timeout=400)
    assert stop.returncode == 0 and f"run {run_id} stopped" in stop.stdout, stop.stdout + stop.stderr
    again = run_cli("stop", run_id, home=home)
    assert again.returncode == 2 and "is stopped, not running: nothing to stop" in again.stderr


def test_detach_needs_a_cluster_and_a_config_inside_the_working_dir(tmp_path, home, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data)
    no_address = run_cli("launch", str(cfg), "--detach", home=home)
    assert no_address.returncode == 2 and "give the cluster with --address" in no_address.stderr
    outside = run_cli("launch", str(cfg), "--detach", "--address", "http://127.0.0.1:9", home=home)
    assert outside.returncode == 2 and "is outside the working directory" in outside.stderr


def test_a_detached_job_that_fails_before_training_is_recorded_failed(tmp_path, home, tiny_data, job_cluster):
    work = tmp_path / "work"
    work.mkdir()
    (work / "run.yaml").write_text(tiny_config(tmp_path, tiny_data).read_text())
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    sub = subprocess.run([os.sys.executable, "-m", "orchestrator.cli", "launch", "run.yaml", "model.factory=nowhere:gpt",
                          "--address", job_cluster, "--detach"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    run_id = sub.stdout.split("submitted run ")[1].split()[0]
    attach = run_cli("attach", run_id, home=home, timeout=300)
    assert attach.returncode == 1 and f"run {run_id} failed" in attach.stdout and "cannot import nowhere" in attach.stdout
