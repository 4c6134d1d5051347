"""A worker process's CPU priority. Torch-free on purpose: a warming standby worker is boosted
through its control thread while its main thread is still importing torch, and an import of torch
here would wait for that one."""

from __future__ import annotations

import os


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
