"""Shared fixtures: a tiny real dataset, one local Ray cluster per session, and a CLI runner.

The Ray cluster is started by this process (so only processes we started are stopped) on
127.0.0.1; CLI tests attach to it with --address, which also exercises the connect path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.pg_server import pg_server, pg_uri, store_uri  # noqa: F401 (a session PostgreSQL; a store per backend)

# Before anything imports ray: keep Ray's node address on loopback (see orchestrator/cluster.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
ORCH = [sys.executable, "-m", "orchestrator.cli"]


def pytest_collection_modifyitems(config, items):
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
