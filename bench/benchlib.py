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


def medians(runs: list[dict], keys, digits: int = 4) -> dict:
    """{key: {"median", "all"}} over the runs that have a value for it (keys no run has are left out)."""
    import statistics

    out = {}
    for key in keys:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = {"median": round(statistics.median(vals), digits), "all": [round(v, digits) for v in vals]}
    return out


def paired_ratio(mine: list[dict], peer: list[dict], key: str, mine_median, peer_median) -> dict | None:
    """mine/peer for `key`: of the medians, and the median of each round's pair (runs alternate)."""
    import statistics

    pairs = [a[key] / b[key] for a, b in zip(mine, peer, strict=False) if a.get(key) and b.get(key)]
    if not peer_median or mine_median is None or not pairs:
        return None
    return {"of_medians": round(mine_median / peer_median, 3), "paired_median": round(statistics.median(pairs), 3),
            "paired_all": [round(x, 3) for x in pairs]}


def step_times(steps: list[tuple[int, float]], warmup: int) -> dict:
    """One rank's (step, finished at) marks: the median gap between consecutive steps after
    `warmup`, the mean over the span, and how many gaps were timed ({} when none)."""
    import statistics

    steps = [(s, t) for s, t in steps if s >= warmup]
    gaps = [b[1] - a[1] for a, b in zip(steps, steps[1:], strict=False) if b[0] == a[0] + 1]
    if not gaps:
        return {}
    return {"step_s": statistics.median(gaps), "step_mean_s": (steps[-1][1] - steps[0][1]) / (steps[-1][0] - steps[0][0]),
            "steps_timed": len(gaps)}


def finished_every_step(records: list[dict], workers: int, max_steps: int) -> bool:
    """Whether every rank's processes, together, got to the last step (records: {"rank", "steps"})."""
    done: dict[int, int] = {}  # rank -> the last step any of its processes finished
    for r in records:
        if r["steps"]:
            done[r["rank"]] = max(done.get(r["rank"], -1), r["steps"][-1][0])
    return len(done) == workers and all(s == max_steps - 1 for s in done.values())
