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
