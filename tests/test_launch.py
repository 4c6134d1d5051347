"""End to end on a real local Ray cluster: launch, track, fail clearly, stop cleanly."""

from __future__ import annotations

import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import cli_json, launch_in_background, run_cli, tiny_config

pytestmark = pytest.mark.ray


# Runs that tests below only look at, launched two at a time (2 workers each on the session
# cluster's 4 CPUs: a launch mostly waits), each into a store of its own.
LAUNCHES = {
    "tracked": dict(telemetry={"prometheus_port": 0}),
    "many_keys": dict(train={"max_steps": 10, "eval_every": 0},
                      model={"factory": "tests.user_models:logging_gpt", "kwargs": {"copies": 40}}),
    "failing": dict(model={"factory": "tests.user_models:failing_gpt", "kwargs": {"fail_rank": 1, "fail_call": 4}},
                    fault_tolerance={"max_restarts": 0}),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_data, ray_address):
    """{name: (its launch, its store)} for LAUNCHES."""
    def launch(name: str):
        tmp = tmp_path_factory.mktemp(name)
        cfg = tiny_config(tmp, tiny_data, **LAUNCHES[name])
        return run_cli("launch", str(cfg), "--address", ray_address, home=tmp / "home"), tmp / "home"

    with ThreadPoolExecutor(2) as pool:
        started = {name: pool.submit(launch, name) for name in LAUNCHES}
        return {name: done.result() for name, done in started.items()}


def test_launch_trains_and_tracks_both_ranks(launched):
    proc, home = launched["tracked"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Prometheus metrics: http://127.0.0.1:" in proc.stdout
    assert "rendezvous done: 2 ranks" in proc.stdout and "backend gloo" in proc.stdout
    assert "orchestrator metrics" in proc.stdout  # tells the user where to look

    (run,) = cli_json("runs", home=home)
    assert run["status"] == "completed" and run["parent"] is None and run["fork_step"] is None
    assert run["id"] in proc.stdout
    keys = set(cli_json("metrics", run["id"], home=home)["keys"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
            "eval/loss", "data/batch_fingerprint", "sys/process_rss_bytes", "sys/cpu_percent"} <= keys

    for rank in (0, 1):
        pts = cli_json("metrics", run["id"], "--key", "train/loss", "--rank", str(rank), home=home)["points"]
        assert [p["step"] for p in pts] == list(range(30))
        first, last = pts[0]["value"], pts[-1]["value"]
        assert first > 5.0 and last < first - 1.0, (first, last)
    agg = cli_json("metrics", run["id"], "--key", "train/loss", home=home)["points"]
    assert all(p["min"] <= p["value"] <= p["max"] for p in agg)
    bucketed = cli_json("metrics", run["id"], "--key", "train/loss", "--buckets", "5", home=home)["points"]
    assert len(bucketed) == 5 and {"step", "value", "min", "max"} <= set(bucketed[0])

    show = cli_json("show", run["id"], home=home)
    assert show["config"]["scaling"]["num_workers"] == 2 and show["world_size"] == 2
    assert show["command"].startswith("orchestrator launch") and show["host"]
    assert show["summary"]["last_loss"] < show["summary"]["first_loss"]
    meta = show["meta"]  # what it takes to reproduce the run
    assert meta["versions"]["torch"].startswith("2.") and meta["versions"]["ray"] and meta["seed"] == 1
    assert len(meta["dataset"]["index_sha256"]) == 64
    assert sorted(w["rank"] for w in meta["workers"]) == [0, 1] and all(w["hostname"] for w in meta["workers"])
    assert "commit" in meta["git"]


def test_user_code_logs_many_keys_per_step(launched):
    """orchestrator.telemetry.log from inside the user's model: ~1,000 keys per step per rank."""
    proc, home = launched["many_keys"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = cli_json("runs", home=home)
    layer_keys = [k for k in cli_json("metrics", run["id"], home=home)["keys"] if k.startswith("layers/")]
    assert len(layer_keys) > 900
    for rank in (0, 1):
        pts = cli_json("metrics", run["id"], "--key", layer_keys[-1], "--rank", str(rank), home=home)["points"]
        assert [p["step"] for p in pts] == list(range(10))


def test_same_seed_same_losses(tmp_path, home, tiny_data, ray_address):
    """Determinism: two runs with one seed log identical losses and data fingerprints."""
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 8, "eval_every": 0})
    with ThreadPoolExecutor(2) as pool:  # side by side on the session cluster's 4 CPUs: a launch mostly waits
        for done in [pool.submit(run_cli, "launch", str(cfg), "--address", ray_address, home=home, check=True)
                     for _ in range(2)]:
            done.result()
    ids = [r["id"] for r in cli_json("runs", home=home)]
    assert len(ids) == 2

    def series(run_id, key):
        return [(p["step"], p["value"]) for p in cli_json("metrics", run_id, "--key", key, "--rank", "0", home=home)["points"]]

    for key in ("train/loss", "data/batch_fingerprint", "train/grad_norm"):
        assert series(ids[0], key) == series(ids[1], key), key


def test_too_many_cpus_fails_clearly_within_timeout(tmp_path, home, tiny_data):
    """Embedded cluster (no --address): an impossible request ends with what was asked and what exists."""
    cfg = tiny_config(tmp_path, tiny_data, scaling={"num_workers": 2, "cpus_per_worker": 64, "start_timeout_s": 1})
    started = time.monotonic()
    proc = run_cli("launch", str(cfg), home=home)
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "cannot reserve 2 workers x {CPU: 64} (= {CPU: 128}) within scaling.start_timeout_s=1" in err
    assert "CPU in total" in err and "node(s)" in err
    assert "Traceback" not in proc.stderr
    assert elapsed < 300  # bounded: never waits forever (not a speed assertion; a busy machine is slow)
    assert cli_json("runs", home=home)[0]["status"] == "failed"


def test_worker_exception_marks_failed_and_shows_rank_traceback_once(launched):
    proc, home = launched["failing"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("orchestrator: error: rank 1 failed during training: RuntimeError")
    assert "injected failure on call 4" in last
    assert proc.stderr.count("injected failure on call 4") == 2  # once in the traceback, once in the summary
    assert proc.stderr.count('tests/user_models.py", line') == 1
    assert "--- rank 1 traceback ---" in proc.stderr and "\x1b[" not in proc.stderr
    (run,) = cli_json("runs", home=home)
    assert run["status"] == "failed"
    assert "rank 1" in cli_json("show", run["id"], home=home)["error"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_marks_interrupted_and_exits_130(tmp_path, home, tiny_data, ray_address, sig):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 100_000, "eval_every": 0})
    proc = launch_in_background(cfg, home=home, address=ray_address)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # wait until training is really under way
            runs = cli_json("runs", home=home) if (home / "store.db").exists() else []
            if runs and "train/loss" in cli_json("metrics", runs[0]["id"], home=home)["keys"]:
                break
            time.sleep(1)
        else:
            pytest.fail("training never started")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    (run,) = cli_json("runs", home=home)
    assert run["status"] == "interrupted"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
