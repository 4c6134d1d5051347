"""Shared fixtures: a tiny real dataset, one local Ray cluster per session, and a CLI runner.

The Ray cluster is started by this process (so only processes we started are stopped) on
127.0.0.1; CLI tests attach to it with --address, which also exercises the connect path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.grouping import tag_groups
from tests.pg_server import pg_server, pg_uri, store_uri  # noqa: F401 (a session PostgreSQL; a store per backend)

# Before anything imports ray: keep Ray's node address on loopback (see orchestrator/cluster.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _ray_token_for_this_session() -> None:
    """Token authentication on, with a token of this test session's own, before anything imports
    Ray. Ray reads RAY_AUTH_MODE once: had a test turned it on later in this process (the CLI's
    cluster.use_token(), run in-process), the clusters this process starts would want a token that
    its own Ray never sends. Its own file, not ~/.ray/auth_token: two xdist workers starting their
    first cluster at once on a fresh machine would each write that one. The xdist workers inherit
    the controller's file, so one token serves the run; the controller removes it at exit."""
    if os.environ.get("RAY_AUTH_MODE") or os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the user's own choice stands
    import atexit
    import secrets
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="orch-tests-ray-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    token = Path(folder) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))


_ray_token_for_this_session()

# Tests stop launches and servers with SIGINT (Ctrl-C). A shell's background job starts with
# SIGINT ignored, and children inherit that (not a handler): give them Python's default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
ORCH = [sys.executable, "-m", "orchestrator.cli"]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    tag_groups(config, items)
    _skip_gpu_tests_without_gpus(items)


def _skip_gpu_tests_without_gpus(items) -> None:
    """@pytest.mark.gpu(count=N): run where CUDA has N GPUs, skip with the reason elsewhere."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in gpu_items:
        need = item.get_closest_marker("gpu").kwargs.get("count", 1)
        if have < need:
            why = "no CUDA here" if not have else f"{have} GPU(s) here"
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), {why} (make test-gpu on a GPU host)"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """A real byte-token dataset from a few stdlib packages, sequences of 65 tokens."""
    from dataloading.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare([str(STDLIB / "json"), str(STDLIB / "email")], str(out), seq_len=65, val_fraction=0.1,
            include=["*.py"], log=lambda *a: None)
    return str(out)


@pytest.fixture(scope="session")
def ray_address():
    import logging

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="orchestrator-tests",
             logging_level=logging.ERROR)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh tracking store for one test (in this process and in CLI subprocesses)."""
    h = tmp_path / "home"
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(h))
    return h


def tiny_config(tmp_path: Path, data_uri: str, **sections) -> Path:
    """A small, fast config file: 2 workers, a 2-layer GPT, 30 steps."""
    import yaml

    cfg = {
        "run": {"name": "tiny", "seed": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "start_timeout_s": 60},
        "cluster": {"dashboard": False},
        "data": {"uri": data_uri, "global_batch_size": 8},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 64},
        "optim": {"lr": 0.005, "warmup_steps": 5},
        "train": {"max_steps": 30, "eval_every": 10, "eval_batches": 2},
        "telemetry": {"flush_every_s": 0.2, "progress_every_s": 1.0, "system_every_s": 0.5},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# A bound for one CLI call, launches included: generous, as a busy shared 2-core machine can take
# minutes to start Ray workers (a quiet one takes seconds); pyproject's pytest timeout is above it.
CLI_TIMEOUT_S = 600


def run_cli(*args: str, home: Path, timeout: float = CLI_TIMEOUT_S, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([*ORCH, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:  # show what it printed, for a run that never ended
        text = [o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (e.stdout, e.stderr)]
        raise AssertionError(f"orchestrator {' '.join(args)} did not end within {timeout:g}s\n" + "\n".join(text)) from None
    if check and proc.returncode != 0:
        raise AssertionError(f"orchestrator {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def launch_in_background(cfg: Path | str, *extra: str, home: Path, address: str, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE) -> subprocess.Popen:
    """`orchestrator launch CFG EXTRA... --address ADDRESS` as a child process (text pipes by default;
    stderr=subprocess.STDOUT merges them), for a test that acts on the run while it trains: kills a
    rank, stops it, sends a signal. The caller ends it (communicate, or kill in a finally)."""
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([*ORCH, "launch", str(cfg), *extra, "--address", address], cwd=REPO, env=env,
                            stdout=stdout, stderr=stderr, text=True)


def free_port() -> int:
    """A port free on 127.0.0.1 now (another process may take it before it is used: bind soon)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_json(*args: str, home: Path):
    return json.loads(run_cli(*args, "--json", home=home, check=True).stdout)


def nvml_gpus() -> int:
    """GPUs the real NVML sees: 0 without a driver."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
