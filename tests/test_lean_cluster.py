"""An embedded cluster without the dashboard runs lean (orchestrator/cluster.py): Ray's task
events, its metrics export and event-loop statistics off, its log monitor and dashboard agent
polling less; with the dashboard asked for, all of it stays on. Checked on the processes Ray
actually started, not on our own settings. Also the benchmark's per-process CPU sampler
(bench/proc_sampler.py) on a process of known cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO

# In a child process: the test session's Ray (a cluster fixture) must not be this one.
PROBE = textwrap.dedent("""
    import base64, json, os, sys
    from pathlib import Path
    import ray
    from orchestrator import cluster

    dashboard = sys.argv[1] == "dashboard"
    cluster.connect(None, dashboard=dashboard)

    @ray.remote(num_cpus=0)
    class Echo:
        def pid(self):
            return os.getpid()

    echo = Echo.remote()
    actor_pid = ray.get(echo.pid.remote(), timeout=120)  # actors still work

    def cmdline(pid):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\\0", b" ").decode()

    def environ(pid):
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\\0")
        return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)

    def tree(pid):
        kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
        return [pid] + [d for k in kids for d in tree(k)]

    def answers(url):
        import urllib.error, urllib.request
        if not url:
            return False
        try:
            urllib.request.urlopen(url + "/api/version", timeout=60)
        except urllib.error.HTTPError:  # 401 with token authentication: it answered
            pass
        return True

    procs = {p: cmdline(p) for p in tree(os.getpid()) if p != os.getpid()}
    gcs = next(c for c in procs.values() if "gcs_server" in c.split(" ", 1)[0])
    arg = next(a for a in gcs.split() if a.startswith("--config_list="))
    config = json.loads(base64.b64decode(arg.split("=", 1)[1]))  # the system config the GCS serves every process
    log_monitor = next(p for p, c in procs.items() if "log_monitor.py" in c)
    print(json.dumps({
        "actor_pid": actor_pid,
        "system_config": {k: config.get(k) for k in cluster.LEAN_SYSTEM_CONFIG},
        "log_monitor_env": {k: v for k, v in environ(log_monitor).items() if k in cluster.LEAN_ENV},
        "actor_env": {k: v for k, v in environ(actor_pid).items() if k in cluster.LEAN_ENV},
        "driver_env": {k: os.environ[k] for k in cluster.LEAN_ENV if k in os.environ},
        "dashboard_url": cluster.dashboard_url(),
        "dashboard_answered": answers(cluster.dashboard_url()),
    }))
    ray.shutdown()
""")


def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *_lean_env())}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _lean_env() -> list[str]:
    from orchestrator.cluster import LEAN_ENV

    return list(LEAN_ENV)


@pytest.mark.ray
def test_an_embedded_cluster_without_the_dashboard_starts_ray_lean():
    from orchestrator.cluster import LEAN_ENV, LEAN_SYSTEM_CONFIG

    got = probe("lean")
    assert got["actor_pid"] > 0
    assert LEAN_SYSTEM_CONFIG and got["system_config"] == LEAN_SYSTEM_CONFIG, got  # what Ray's GCS runs with
    assert LEAN_ENV and got["log_monitor_env"] == LEAN_ENV, got  # the daemons started with the lean settings
    assert got["driver_env"] == {}, got  # and this process's environment is as it was
    assert got["dashboard_url"] is None, got


@pytest.mark.ray
def test_with_the_dashboard_asked_for_ray_keeps_everything_it_shows():
    got = probe("dashboard")
    assert set(got["system_config"].values()) == {None}, got  # Ray's defaults: the dashboard shows all of it
    assert got["log_monitor_env"] == {} and got["actor_env"] == {}, got
    assert got["dashboard_url"].startswith("http://127.0.0.1:") and got["dashboard_answered"], got


def test_environment_for_the_cluster_start_keeps_the_users_own_values(monkeypatch):
    from orchestrator.cluster import _environment

    monkeypatch.setenv("LOG_NAME_UPDATE_INTERVAL_S", "7")
    monkeypatch.delenv("REPORTER_UPDATE_INTERVAL_MS", raising=False)
    with _environment({"LOG_NAME_UPDATE_INTERVAL_S": "1.0", "REPORTER_UPDATE_INTERVAL_MS": "60000"}):
        assert os.environ["LOG_NAME_UPDATE_INTERVAL_S"] == "7"  # the user's wins
        assert os.environ["REPORTER_UPDATE_INTERVAL_MS"] == "60000"
    assert os.environ["LOG_NAME_UPDATE_INTERVAL_S"] == "7"
    assert "REPORTER_UPDATE_INTERVAL_MS" not in os.environ


# --- the benchmark's sampler -----------------------------------------------------------------

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0:\n    pass\ntime.sleep(30)"


def test_proc_sampler_finds_a_process_by_pid_and_measures_its_cores():
    sys.path.insert(0, str(REPO / "bench"))
    from proc_sampler import ProcSampler, label_of

    child = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        sampler = ProcSampler(None, named=lambda: {child.pid: "rank0"}, every_s=0.2).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the child has burnt its second and sleeps
            s = sampler.series.get(child.pid, [])
            if len(s) >= 3 and s[-1][1] >= 1.0 and s[-1][1] == s[-3][1]:
                break
            time.sleep(0.2)
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    series = sampler.series[child.pid]
    assert series and sampler.labels[child.pid] == "rank0"
    assert 0.9 <= sampler.totals()["rank0"] <= 1.5, series  # one CPU second of work, interpreter start-up
    t0, t1 = series[0][0], series[-1][0]
    assert t1 > t0
    busy = sampler.cores(t0, t1)["rank0"]
    assert 0 < busy <= 1.05, series  # a single thread: at most one core
    idle_from = next(t for t, c in series if c == series[-1][1])
    if t1 - idle_from > 0.3:
        assert sampler.cores(idle_from, t1)["rank0"] == 0.0  # asleep: no CPU in that window

    assert label_of("ray::TrainWorker.execute") == "TrainWorker"
    assert label_of("ray::demo:demo-2026-ab12:checkpoints:CheckpointCoordinator") == "CheckpointCoordinator"
    assert label_of("ray::IDLE") is None  # may host an actor a moment later
    assert label_of("/x/bin/python /x/ray/_private/workers/default_worker.py --node-ip-address=127.0.0.1") is None
    assert label_of("/x/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp") == "gcs_server"
    assert label_of("/x/ray/core/src/ray/raylet/raylet --python_worker_command=/x/default_worker.py") == "raylet"


def test_proc_sampler_window_is_where_the_run_first_reached_each_step():
    sys.path.insert(0, str(REPO / "bench"))
    from proc_sampler import ProcSampler

    s = ProcSampler(None)
    s.marks = [(10.0, 0), (11.0, 4), (12.0, 12), (13.0, 50), (14.0, 95), (15.0, 100)]
    assert s.window(10, 89) == (12.0, 14.0)
    assert s.window(10, 200) is None  # never got there
    s.series = {1: [(10.0, 0.0), (12.0, 1.0), (14.0, 2.0)]}
    s.labels = {1: "MetricsActor"}
    assert s.cores(11.0, 13.0) == {"MetricsActor": pytest.approx(0.5)}  # interpolated between samples
