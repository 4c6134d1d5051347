"""What the kernel says a rank's process is doing: its state letter in /proc/<pid>/stat (and the
kernel function it sleeps in, /proc/<pid>/wchan), read on the rank's own node.

A late heartbeat alone cannot tell a frozen process from a busy host; the kernel can. State 'T'
(stopped by a signal: SIGSTOP, SIGTSTP) is proof of a frozen process, where 't' (a tracing stop:
debuggers and py-spy cause it for a moment) is not. 'D' (uninterruptible sleep, e.g. in a hung
GPU driver) is worth reporting but proves nothing on its own. 'Z' or no /proc entry: the process
is gone.

The reading runs as a small Ray task pinned to the rank's node (no CPU, never retried), and, where
a process of ours already runs on that node (another rank's worker, a standby spare), in that
process too: the first answer wins. A task needs an idle Ray worker on the node, and on a node
whose cores the ranks keep busy starting one took seconds (a frozen rank named 2.7-5.7 s after
its SIGSTOP in goodput runs, against ~2.5 s where a worker was at hand). Whoever asks gets no
answer rather than an error when the node, Ray or /proc does not cooperate.
"""

from __future__ import annotations

import os
import time

CONFIRM_S = 0.5  # a stopped process is read again this much later: one look could catch a brief stop
GONE = "gone"  # the state of a pid with no /proc entry

MEANING = {
    "R": "running", "S": "sleeping", "D": "uninterruptible sleep", "T": "stopped by a signal",
    "t": "tracing stop", "Z": "zombie", "X": "dead", "I": "idle", "P": "parked", GONE: "no /proc entry",
}


def read(pid: int, proc: str = "/proc") -> dict:
    """{"pid", "state", "wchan", "at"} of process `pid`; state GONE when it has no /proc entry.
    `at` is this node's time.time(), the clock the rank's heartbeats carry too."""
    at = time.time()
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return {"pid": pid, "state": GONE, "wchan": None, "at": at}
    state = _state(stat)
    out = {"pid": pid, "state": state, "wchan": _wchan(f"{proc}/{pid}"), "at": at}
    if state not in ("T", "Z", "X", "D"):
        # the thread stuck in the kernel is often not the main one (a training or a driver thread)
        stuck = _stuck_thread(pid, proc)
        if stuck is not None:
            out.update(state="D", tid=stuck, wchan=_wchan(f"{proc}/{pid}/task/{stuck}"))
    return out


def _state(stat: str) -> str:
    # "pid (comm) S ...": comm may hold spaces and parentheses, so the state follows the last ')'
    fields = stat[stat.rfind(")") + 1:].split()
    return fields[0] if fields else "?"


def _stuck_thread(pid: int, proc: str) -> int | None:
    """A thread of the process in uninterruptible sleep (D), if any."""
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"{proc}/{pid}/task/{tid}/stat", "rb") as f:
                if _state(f.read().decode(errors="replace")) == "D":
                    return int(tid)
        except (OSError, ValueError):
            continue
    return None


def _wchan(path: str) -> str | None:
    """The kernel function a process or thread waits in; None when running, hidden or absent."""
    try:
        with open(f"{path}/wchan") as f:
            text = f.read().strip()
    except OSError:
        return None
    return text if text and text != "0" else None


def sample(pids: list[int], confirm_s: float = CONFIRM_S) -> list[dict]:
    """The task body: every pid once, and the stopped or stuck ones (T, D) once more `confirm_s`
    later, so one round trip brings two looks."""
    first = [read(pid) for pid in pids]
    again = [s["pid"] for s in first if s["state"] in ("T", "D")]
    if not again:
        return first
    time.sleep(confirm_s)
    return first + [read(pid) for pid in again]


class RayProbe:
    """Process states read on the ranks' nodes by Ray tasks; asynchronous, so a caller that ticks
    never blocks on a slow node. One request per node at a time. `reader(node, pids)`: the ref
    of the same read by a process of ours already running on that node, or None."""

    def __init__(self, timeout_s: float = 10.0, reader=None):
        self.timeout_s, self.reader = timeout_s, reader
        self.pending: dict[object, tuple[str, dict[int, int], float]] = {}  # ref -> (node, rank -> pid, sent)

    def busy(self) -> bool:
        return bool(self.pending)

    def request(self, node_id: str, pids: dict[int, int]) -> None:
        """Read the processes `pids` (rank -> pid) on node `node_id`, unless that node is being read."""
        if not pids or any(node == node_id for node, _, _ in self.pending.values()):
            return
        try:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            if not ray.is_initialized():  # never start a cluster just to look
                return
            refs = [_task().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
                sorted(set(pids.values())))]
        except Exception:  # a node id Ray does not know, a driver shutting down: no answer
            return
        if self.reader is not None:
            try:
                ref = self.reader(node_id, sorted(set(pids.values())))
                if ref is not None:
                    refs.append(ref)
            except Exception:  # that process is gone: the task still answers
                pass
        for ref in refs:
            self.pending[ref] = (node_id, dict(pids), time.monotonic())

    def answers(self) -> dict[int, list[dict]]:
        """rank -> the samples of its process that arrived since the last call. A task past the
        timeout is given up (unknown), never waited for."""
        if not self.pending:
            return {}
        import ray

        got: dict[int, list[dict]] = {}
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        for ref in done:
            if ref not in self.pending:  # the other read of its request answered first
                continue
            node, pids, _ = self.pending.pop(ref)
            try:
                samples = ray.get(ref, timeout=1)
            except Exception:  # the node died under it, the worker could not start: unknown (the other may answer)
                continue
            for rank, pid in pids.items():
                got[rank] = [s for s in samples if s["pid"] == pid]
            for other in [r for r, (n, _, _) in self.pending.items() if n == node]:  # its twin: no longer needed
                del self.pending[other]
                _cancel(other)
        now = time.monotonic()
        for ref, (_, _, sent) in list(self.pending.items()):
            if now - sent > self.timeout_s:
                del self.pending[ref]
                _cancel(ref)
        return got

    def reset(self) -> None:
        """A new group: its processes are others; answers about the old ones are dropped."""
        self.pending.clear()


def _cancel(ref) -> None:
    try:
        import ray

        ray.cancel(ref)
    except Exception:  # an actor task that already ran, a driver shutting down
        pass


_remote = None


def _task():
    """The Ray task, made once (the import of Ray stays out of this module's import)."""
    global _remote
    if _remote is None:
        import ray

        _remote = ray.remote(num_cpus=0, max_retries=0)(sample)
    return _remote

