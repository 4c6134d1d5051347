"""CPU seconds of the processes of a run, by pid, sampled over time: what each rank, each run
actor and each Ray daemon costs while the run trains (steady state), not only over its lifetime.

Ranks are named by pid (given by the caller: the worker pids the run recorded, or the bare loop's
children), never by command line: a process title is whatever the process last set (a Ray worker
is `ray::IDLE` until it hosts an actor) and may not name the actor at all. Everything else
descending from the root process is named from its command line. Reading /proc directly keeps a
sampling pass to about a millisecond, so the sampler itself barely competes with what it measures;
both sides of a benchmark are sampled the same way.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3 of stat
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's list: a child belongs to the thread that forked it)."""
    out = []
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(task.path, "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def label_of(cmdline: str) -> str | None:
    """What a process of an embedded Ray cluster is, from its command line; None: not known yet
    (an idle Ray worker, which may host an actor a moment later)."""
    first = cmdline.split(" ", 1)[0]
    if cmdline.startswith("ray::"):
        # "ray::TrainWorker.execute" -> TrainWorker; a named actor's may carry its name before the
        # class ("ray::run:id:checkpoints:CheckpointCoordinator"), and names have colons and dots
        name = first[len("ray::"):].rsplit(":", 1)[-1].split(".", 1)[0]
        return None if name == "IDLE" else name
    for key, label in (("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"), ("dashboard/dashboard.py", "dashboard"),
                       ("dashboard/agent.py", "DashboardAgent"), ("log_monitor.py", "log_monitor"),
                       ("autoscaler/_private/monitor.py", "autoscaler_monitor"), ("runtime_env/agent", "RuntimeEnvAgent"),
                       ("orchestrator launch", "driver"), ("orchestrator.cli launch", "driver")):
        if key in cmdline:
            return label
    if "default_worker.py" in cmdline:  # after the raylet, whose command line names it too
        return None  # a Ray worker before it set its title
    return Path(first).name or "other"


class ProcSampler:
    """Samples, every `every_s`, the CPU seconds of `root`'s descendants and of the pids
    `named()` returns ({pid: label}, e.g. {worker pid: "rank0"}), and `progress()` (the step the
    run is at, or None), from a daemon thread until stop()."""

    def __init__(self, root: int | None, *, named: Callable[[], dict[int, str]] = dict,
                 progress: Callable[[], int | None] = lambda: None, every_s: float = 1.0):
        self.root, self.named, self.progress, self.every_s = root, named, progress, every_s
        self.series: dict[int, list[tuple[float, float]]] = {}  # pid -> [(time, cpu seconds)]
        self.labels: dict[int, str] = {}
        self.marks: list[tuple[float, int]] = []  # (time, step)
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def start(self) -> ProcSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sample()  # the final totals of whatever is still alive

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        now = time.time()
        try:
            named = self.named() or {}
        except Exception:  # the run's record is not readable yet
            named = {}
        try:
            step = self.progress()
        except Exception:
            step = None
        if step is not None:
            self.marks.append((now, step))
        pids = set(named) | (set(descendants(self.root)) if self.root else set())
        for pid in pids:
            cpu = cpu_seconds(pid)
            if cpu is None:
                continue
            self.series.setdefault(pid, []).append((now, cpu))
            if pid in named:
                self.labels[pid] = named[pid]
            elif pid not in self._names:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    continue
                label = label_of(cmd)
                if label is not None:
                    self._names[pid] = label
                self.labels[pid] = label or "idle_worker"
            else:
                self.labels[pid] = self._names[pid]

    # --- after the run ---------------------------------------------------------------------

    def totals(self) -> dict[str, float]:
        """Lifetime CPU seconds per label (start-up and teardown included)."""
        out: dict[str, float] = {}
        for pid, s in self.series.items():
            label = self.labels.get(pid, "other")
            out[label] = out.get(label, 0.0) + s[-1][1]
        return out

    def cores(self, t0: float, t1: float) -> dict[str, float]:
        """Mean cores used per label between times t0 and t1 (CPU seconds interpolated between
        samples); processes not alive over the whole window count for the part they were."""
        out: dict[str, float] = {}
        if t1 <= t0:
            return out
        for pid, s in self.series.items():
            used = _at(s, t1) - _at(s, t0)
            label = self.labels.get(pid, "other")
            out[label] = out.get(label, 0.0) + used / (t1 - t0)
        return out

    def window(self, first_step: int, last_step: int) -> tuple[float, float] | None:
        """The times the run was first seen at or past `first_step` and at or past `last_step`."""
        t0 = next((t for t, s in self.marks if s >= first_step), None)
        t1 = next((t for t, s in self.marks if s >= last_step), None)
        return (t0, t1) if t0 is not None and t1 is not None and t1 > t0 else None


def _at(series: list[tuple[float, float]], t: float) -> float:
    """CPU seconds at time t: 0 before the first sample (not yet born), the last after the end."""
    if t <= series[0][0]:
        return 0.0 if t < series[0][0] else series[0][1]
    for (ta, ca), (tb, cb) in zip(series, series[1:], strict=False):
        if ta <= t <= tb:
            return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else cb
    return series[-1][1]
