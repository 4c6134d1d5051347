"""Heartbeats, the rank side: each rank's training thread updates a few counters; a thread of
its own sends them to the run's health monitor (actors/health.py) every `hang.heartbeat_s`, so a
rank stuck in a collective, a data read or a frozen process still shows what it was doing.

Collectives are counted as entered when issued and as completed when they complete, which is not
when the host gets past them on CUDA: there DDP's all-reduces are queued on a stream and the host
runs ahead to a later sync (`loss.item()`), in another phase. So an asynchronous collective leaves
a handle (a CUDA event recorded after it, or the torch Work of an `async_op=True` call) that the
heartbeat thread settles when it completes. Counted at issue, every rank would look done with a
collective the group is in fact stuck in, and a rank hung in forward could not be told apart.

The same thread answers the driver's request for torch Flight Recorder dumps after a stall: the
training thread may be blocked inside a collective, but this one is free (gloo and NCCL waits
release the GIL). A frozen process answers nothing, which is evidence too.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time


class Health:
    """What a rank is doing; written by the training thread (plain attribute stores, no locks)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.step = -1  # last completed step
        self.progress = 0  # steps and eval batches done: a long eval is not a stall
        self.phase = "start"
        self.coll_entered = 0
        self.coll_completed = 0  # synchronous ones, counted by the training thread
        self.pending: collections.deque = collections.deque()  # asynchronous ones, oldest first
        self._settled = 0  # of those, completed (under the lock: two threads settle)
        self._lock = threading.Lock()
        self.step_started = time.time()
        self.pid = os.getpid()  # the process whose stack a stall report shows (a script's child)
        self.beat_pid = self.pid  # the process the heartbeat thread runs in (a script's worker)

    def completes_later(self, handle) -> None:
        """An issued collective that completes after the host moved on: `handle` is a torch Work
        (`is_completed()`) or a CUDA event recorded after it (`query()`)."""
        self.pending.append(handle)
        if len(self.pending) > 64:  # no heartbeat thread settling them (hang detection off): stay bounded
            self._settle()

    def _settle(self) -> int:
        with self._lock:
            # a process group completes its collectives in issue order: stop at the first still running
            while self.pending:
                handle = self.pending[0]
                if not (handle.query() if hasattr(handle, "query") else handle.is_completed()):
                    break
                self.pending.popleft()
                self._settled += 1
            return self._settled

    def snapshot(self) -> dict:
        completed = self.coll_completed + self._settle()
        snap = {"rank": self.rank, "step": self.step, "phase": self.phase, "progress": self.progress,
                "coll_entered": self.coll_entered, "coll_completed": completed, "time": time.time(),
                "pid": self.pid}  # whose process state the watchdog reads when the beats are late (procstate.py)
        if self.beat_pid != self.pid:
            snap["beat_pid"] = self.beat_pid
        return snap


def flight_recorder_dump(keep: int = 200) -> str | None:
    """This process's Flight Recorder ring buffer as JSON text, its last `keep` entries (what
    the missing-rank analysis reads; hundreds of full buffers would flood the monitor), or None
    when torch has none (TORCH_FR_BUFFER_SIZE unset, no process group, a torch without it)."""
    try:
        import torch.distributed as dist
        from torch._C import _distributed_c10d as c10d
    except ImportError:
        return None
    # NCCL keeps its own recorder (TORCH_NCCL_TRACE_BUFFER_SIZE); gloo and the rest use torch's generic one
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    dump_json = getattr(c10d, "_dump_nccl_trace_json" if nccl else "_dump_fr_trace_json", None)
    if dump_json is None:
        return None
    try:
        dump = json.loads(dump_json(True, False))
    except Exception:
        return None
    dump["entries"] = dump.get("entries", [])[-keep:]
    return json.dumps(dump)


def stack_dump(pid: int, timeout_s: float = 20.0, max_chars: int = 20_000) -> str | None:
    """Every thread's Python stack in process `pid`, by py-spy (read from outside, so it works
    while the process is stuck in a collective or in C code), or None when py-spy is missing."""
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        return None
    try:
        done = subprocess.run([exe, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"py-spy dump failed: {type(e).__name__}"
    text = done.stdout if done.returncode == 0 else f"py-spy dump failed: {done.stderr.strip().splitlines()[:1]}"
    return text[:max_chars]


class Heartbeat:
    """The heartbeat thread. With `relay` (the node's relay, actors/node_relay.py), beats go to it
    and it forwards the node's beats in one call a tick. The rank also beats the monitor directly
    while the relay lets it down: its last beat is still unanswered a tick later (stuck), it says
    its own forwards lag ("ok" False), or it is gone (for good, then)."""

    def __init__(self, monitor, health: Health, every_s: float, *, relay=None):
        self.monitor, self.health, self.every_s, self.relay = monitor, health, every_s, relay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._answered: int | None = None  # the last dump request served; None: not seen one yet
        self._serving = threading.Lock()  # the beat thread and serve_dump_now may both serve a request
        self.direct_beats = 0  # sent to the monitor while a relay was set (its fallback)

    def start(self) -> Heartbeat:
        global _running
        self._thread.start()
        _running = self
        return self

    def _run(self) -> None:
        import ray

        last = via_relay = None
        relayed = self.relay is not None
        while True:
            try:
                direct = self.relay is None
                if via_relay is not None:
                    answered, ok = self._relay_answer(via_relay)
                    direct = not ok
                    via_relay = None if answered else via_relay  # a stuck call is not repeated, only watched
                if last is not None and ray.wait([last], timeout=0)[0]:  # never blocks on the monitor
                    self._serve(ray.get(last))
                snapshot = self.health.snapshot()
                if self.relay is not None and via_relay is None:
                    via_relay = self.relay.beat.remote(snapshot)
                last = self.monitor.beat.remote(snapshot) if direct else None
                self.direct_beats += direct and relayed
            except Exception:  # the monitor is gone: the driver is tearing down
                last = None
            if self._stop.wait(self.every_s):
                return

    def _relay_answer(self, ref) -> tuple[bool, bool]:
        """(answered, keeps up) for the last beat sent to the relay; serves the dump request it carries."""
        import ray

        if not ray.wait([ref], timeout=0)[0]:
            return False, False  # stuck a whole tick: beat directly until it answers
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayActorError:  # gone: this rank beats directly from now on
            self.relay = None
            return True, False
        except Exception:
            return True, False
        if answer["request"] is not None:  # None: the relay has not heard from the monitor yet
            self._serve(answer["request"])
        return True, answer["ok"]

    def _serve(self, request: int, *, fresh: bool = False) -> None:
        """fresh: the request is known to be this group's (served at once, not taken as an old one)."""
        with self._serving:
            if self._answered is None and not fresh:  # requests made before this rank started were for an earlier group
                self._answered = request
            elif request > (self._answered or 0):
                self._answered = request
                self.monitor.put_dump.remote(self.health.rank, request, flight_recorder_dump(),
                                             stack_dump(self.health.pid))

    def stop(self) -> None:
        global _running
        self._stop.set()
        self._thread.join(timeout=self.every_s + 2)
        if _running is self:
            _running = None


_running: Heartbeat | None = None  # this process's rank's heartbeat, for serve_dump_now


def serve_dump_now(request: int) -> bool:
    """Run in a worker's control lane at a stall: this rank's dump for `request` goes to the monitor
    now, not at the next beat (through a relay the request takes up to two beats to arrive).
    False when this process has no heartbeat (a script's runs in the script's process)."""
    beat = _running
    if beat is None:
        return False
    beat._serve(request, fresh=True)
    return True
