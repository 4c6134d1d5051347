"""`orchestrator stop RUN`, on the ranks' side: every rank ends after the same step, with a final
checkpoint of that step.

The driver tells each rank through its worker's control lane (worker_group.py: a second
concurrency group beside the one running the training call), which calls `request()` here. The
ranks cannot each act on it when they happen to see it: they would stop after different steps.
So they agree: at every step boundary each rank contributes its flag to one all-reduce of a
single number, issued there and read at the next boundary (async, so it overlaps a step instead
of adding a synchronisation). A request any rank saw by step s stops every rank after step s+1.

Script entrypoints are told differently (script.py): their child process gets SIGTERM, as
torchrun's agent does when it is stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_requested = threading.Event()
_listeners: list[Callable[[], None]] = []


def request() -> bool:
    """Runs in the rank's process, in the worker's control lane: the driver asks it to stop."""
    _requested.set()
    for fn in list(_listeners):
        fn()
    return True


def requested() -> bool:
    return _requested.is_set()


def reset() -> None:
    """Forget a request (each attempt has fresh worker processes; tests reuse theirs)."""
    _requested.clear()
    _listeners.clear()


def on_request(fn: Callable[[], None]) -> None:
    """Call fn (from the control lane) when a stop is requested; at once if it already was."""
    _listeners.append(fn)
    if _requested.is_set():
        fn()


class Stop(BaseException):  # noqa: N818 (a signal to unwind, like SystemExit, not an error)
    """Raised by ctx.save in a user's function once the ranks agreed to stop (its checkpoint is saved)."""

    def __init__(self, steps_done: int):
        super().__init__(f"stopped after step {steps_done}")
        self.steps_done = steps_done


class Agreement:
    """Call should_stop() once per step boundary on every rank (the same number of times on each):
    True on every rank at the same boundary once any rank saw a request."""

    def __init__(self, world_size: int, device=None, health=None):
        self.world_size, self.device, self.health = world_size, device, health
        self._flag = None
        self._work = None

    def should_stop(self) -> bool:
        if self.world_size <= 1:
            return requested()
        import torch
        import torch.distributed as dist

        if self._wait():
            return True  # nothing more in flight: every rank stops here
        self._flag = torch.tensor([1.0 if requested() else 0.0], device=self.device)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        return False

    def close(self) -> None:
        """Before the group goes away: the all-reduce still in flight completes on every rank."""
        if self.world_size > 1:
            self._wait()

    def _wait(self) -> bool:
        if self._work is None:
            return False
        h = self.health
        if h is not None:  # a collective, for the hang watchdog like every other
            h.coll_entered += 1
        self._work.wait()
        if h is not None:
            h.coll_completed += 1
        agreed = bool(self._flag.item() > 0)
        self._work = self._flag = None
        return agreed
