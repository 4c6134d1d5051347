"""Detached runs as Ray Jobs on a cluster with a dashboard (a `ray start` head this test starts on
127.0.0.1): launch returns at once, the run is followed from another command, stopped on request,
and the bad cases are one line each. The dashboard link launch prints is opened in headless
Chromium (signing in with Ray's token when the cluster asks for one) and shows the run's job and
actors; our gauges reach the node's Ray metrics export."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_json, free_port, run_cli, tiny_config

pytestmark = pytest.mark.ray

RAY = str(Path(os.sys.executable).parent / "ray")
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 90_000  # chromium and the dashboard on a busy 2-core machine are slow


class Head(str):
    """The dashboard URL, and the head's metrics export port."""

    metrics_port: int


@pytest.fixture(scope="module")
def job_cluster(tmp_path_factory):
    """A head with the dashboard (the Jobs API) on loopback; stopped by the pids it started."""
    temp = Path("/tmp") / f"orch-jobs-{os.getpid()}"
    dash, metrics_port = free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
                           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port",
                           str(dash), "--num-cpus", "3", "--temp-dir", str(temp), "--disable-usage-stats",
                           # the job agent's own ports: other Ray clusters on this machine hold the defaults
                           "--dashboard-agent-listen-port", str(free_port()),
                           "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(metrics_port),
                           "--ray-client-server-port", str(free_port())],  # its default, 10001, is one per machine
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = Head(f"http://127.0.0.1:{dash}")
    head.metrics_port = metrics_port
    try:
        yield head
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
    link = re.search(r"Jobs view: (\S+)", sub.stdout).group(1)
    the_link_shows_the_job_and_its_actors(link, job_cluster, run_id, sub.stdout, env, tmp_path)
    our_gauges_reach_rays_metrics_export(job_cluster.metrics_port, run_id, time.monotonic() + 180)
    stop = run_cli("stop", run_id, home=home, timeout=400)
    assert stop.returncode == 0 and f"run {run_id} stopped" in stop.stdout, stop.stdout + stop.stderr
    again = run_cli("stop", run_id, home=home)
    assert again.returncode == 2 and "is stopped, not running: nothing to stop" in again.stderr


def test_a_job_submitted_again_under_resume_auto_continues_the_run(tmp_path, home, tiny_data, job_cluster):
    """The KubeRay pattern with --detach: the same job submitted again continues the unfinished run
    of that name from its checkpoint, under the same run id, instead of starting over."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "run.yaml").write_text(tiny_config(tmp_path, tiny_data).read_text())
    (work / "user_models.py").write_text((REPO / "tests" / "user_models.py").read_text())
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home), "PYTHONPATH": str(work)}
    env.pop("RAY_ADDRESS", None)

    def submit(fail_call: int) -> subprocess.CompletedProcess:
        sub = subprocess.run([os.sys.executable, "-m", "orchestrator.cli", "launch", "run.yaml", "run.name=again",
                              "run.resume=auto", "train.max_steps=16", "checkpoint.every_steps=4",
                              "fault_tolerance.max_restarts=0", "model.factory=user_models:failing_gpt",
                              f"model.kwargs={{fail_call: {fail_call}}}", "--address", job_cluster, "--detach"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        return sub

    first = submit(fail_call=11)  # fails at step 10 of 16, after the checkpoints of steps 4 and 8
    run_id = first.stdout.split("submitted run ")[1].split()[0]
    attach = run_cli("attach", run_id, home=home, timeout=300)
    assert attach.returncode == 1 and f"run {run_id} failed" in attach.stdout, attach.stdout + attach.stderr
    again = submit(fail_call=10_000)
    assert f"run.resume=auto: continuing run {run_id} (failed)" in again.stdout, again.stdout
    assert again.stdout.split("submitted run ")[1].split()[0] == run_id
    attach = run_cli("attach", run_id, home=home, timeout=300)
    assert attach.returncode == 0 and f"run {run_id} completed" in attach.stdout, attach.stdout + attach.stderr
    shown = cli_json("show", run_id, home=home)
    assert [a["status"] for a in shown["attempts"]] == ["failed", "completed"]
    assert shown["attempts"][1]["resumed_from_step"] in (4, 8)  # a committed checkpoint, not step 0
    assert [r["id"] for r in cli_json("runs", home=home) if r["name"] == "again"] == [run_id]


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


def the_link_shows_the_job_and_its_actors(link: str, dashboard: str, run_id: str, printed: str, env: dict,
                                          shots: Path) -> None:
    """What a user does with the printed link: open it; if Ray's token authentication is on, the
    page asks for the token, and the hint printed beside the link says where it comes from."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: pip install -e '.[test]'")
    with urllib.request.urlopen(f"{dashboard}/api/authentication_mode", timeout=30) as r:
        mode = json.loads(r.read())["authentication_mode"].lower()
    token = None
    if mode == "token":
        assert "`ray get-auth-token`" in printed, printed  # the hint, on the line with the link
        got = subprocess.run([RAY, "get-auth-token"], env=env, capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        token = got.stdout.strip().splitlines()[-1]
        req = urllib.request.Request(f"{dashboard}/api/jobs/")
        with pytest.raises(urllib.error.HTTPError) as denied:  # what the page gets without signing in
            urllib.request.urlopen(req, timeout=30)
        assert denied.value.code == 401
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, timeout=WAIT_MS, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.goto(link)
            if token is not None:  # Ray's own dialog ("Authentication Token Required"); it keeps a cookie
                page.get_by_role("textbox", name="Authentication Token").fill(token)
                with page.expect_navigation():  # the page reloads once the token is accepted
                    page.get_by_role("button", name="Submit").click()
                page.goto(link)
            page.get_by_text(run_id).first.wait_for()  # the job, by its submission id (= the run id)
            page.goto(link.split("#")[0] + "#/actors")
            for actor in (f":{run_id}:rank0", f":{run_id}:rank1", f":{run_id}:metrics"):
                page.get_by_text(actor).first.wait_for()  # the run's structure, by name
            page.screenshot(path=str(shots / "ray-dashboard-actors.png"))
        finally:
            browser.close()


def our_gauges_reach_rays_metrics_export(port: int, run_id: str, deadline: float) -> None:
    """The metrics actor's `ray.util.metrics` gauges, as Ray's Prometheus export on the node
    serves them (what Ray's Grafana dashboards read); Ray exports every ~10 s."""
    seen = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            seen = r.read().decode()
        ours = [line for line in seen.splitlines() if "orchestrator_step" in line and f'run="{run_id}"' in line]
        if ours and not ours[0].startswith("#") and float(ours[0].rsplit(" ", 1)[1]) >= 0:
            return  # a step of the run (-1 until the first one is exported)
        time.sleep(2.0)
    names = sorted({line.split("{")[0] for line in seen.splitlines() if "orchestrator" in line})
    raise AssertionError(f"no orchestrator_step gauge >= 0 for run {run_id} on the metrics export port; "
                         f"orchestrator names there: {names}; its lines: {ours}")

