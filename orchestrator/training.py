"""A rank's process, set up for training: its priority, torch's threads, deterministic
algorithms (rendezvous.join calls setup_torch).

The built-in GPT loop itself is a training function on ctx, orchestrator/gpt_function.py
(train_gpt), run by entrypoints.run_gpt.
"""

from __future__ import annotations

import os
import sys

import torch

from orchestrator.config import Config


def setup_torch(cfg: Config, rank: int) -> None:
    normal_priority()  # first: the threads torch and gloo start from here on inherit it
    torch.set_num_threads(cfg.scaling.torch_threads)
    if cfg.train.deterministic:
        use_deterministic_algorithms(compiling=cfg.train.compile)


def normal_priority() -> int:
    """Ray starts every worker process at nice 15 (its `worker_niceness`, so tasks never starve
    its daemons). A rank is the job itself: at 15 any nice-0 process (a Ray daemon waking up,
    another tenant) takes the core from it, and a DDP group runs at its slowest rank's pace
    (measured: same CPU per step as a bare loop, 1.8-2.2x the wall time under load; docs/BENCHMARKS.md).
    So every thread of this process goes back to the niceness of the process that started it
    (the raylet: that of `ray start`/the driver), never above it, when allowed (root or
    CAP_SYS_NICE; otherwise it stays as it is). Linux keeps a niceness per thread. Returns the
    niceness now."""
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())
        if os.getpriority(os.PRIO_PROCESS, 0) <= target:
            return os.getpriority(os.PRIO_PROCESS, 0)
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), target)
    except (OSError, AttributeError):  # not permitted, a thread gone meanwhile, no /proc (not Linux)
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def use_deterministic_algorithms(*, compiling: bool = False) -> None:
    """torch.use_deterministic_algorithms(True) without its import of torch._inductor, which costs
    seconds on every worker start (and so on every restart), unless the model will be compiled:
    then inductor is told too."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    if compiling:
        torch.use_deterministic_algorithms(True)
        return
    torch._C._set_deterministic_algorithms(True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True
