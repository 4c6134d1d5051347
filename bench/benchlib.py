"""What every benchmark records next to its figures: the machine and the code it ran on.
(Benchmarks run as scripts, `python bench/NAME.py`, so this folder is on sys.path.)"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine(**extra) -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": round(mem / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, **extra}


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_files": len(git("status", "--porcelain").splitlines())}


def tree_cpu(proc, kinds: dict[str, str], deadline: float = float("inf")) -> dict:
    """Until `proc` ends (or `deadline`, time.time()), sample the CPU seconds of it and its
    descendants (Ray's raylet, GCS, agents, actors). Returns lifetime totals per kind: a process
    whose command line contains a key of `kinds` counts as that kind, the rest as "other"."""
    import time

    import psutil  # a Ray dependency

    seen: dict[int, tuple[str, float]] = {}
    # once named, a process keeps its kind (an exiting one shows no cmdline); until then it is
    # looked at again: a Ray worker is "ray::IDLE" until it hosts an actor, then "ray::TrainWorker..."
    named: dict[int, str] = {}
    while proc.poll() is None and time.time() < deadline:
        try:
            procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cmd = " ".join(p.cmdline())
                if p.pid not in named:
                    kind = next((kind for key, kind in kinds.items() if key in cmd), None)
                    if kind is not None:
                        named[p.pid] = kind
                seen[p.pid] = (named.get(p.pid, "other"), t.user + t.system)
            except psutil.Error:
                pass
        time.sleep(1.0)
    totals = dict.fromkeys([*kinds.values(), "other"], 0.0)
    for kind, cpu in seen.values():
        totals[kind] += cpu
    return totals
