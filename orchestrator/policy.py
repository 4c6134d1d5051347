"""Policies: pure decisions the controller asks for, each testable one case at a time.

  RestartPolicy    restart or give up, for every kind of failure, and the backoff before it
  ElasticPolicy    which group sizes to try, and when to regrow once capacity is back
  StragglerPolicy  when to replace a straggling rank (at the next checkpoint, so no step is lost)
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from common.labels import node_label
from orchestrator.config import OnNonFinite, StragglerAction


class FailureKind(str, Enum):
    EXCEPTION = "exception"  # a rank raised (its traceback is kept)
    DIED = "died"  # a worker process is gone (SIGKILL, OOM killer)
    NODE_LOST = "node_lost"  # the node under a worker left the cluster
    NON_FINITE = "non_finite_loss"
    HANG = "hang"  # the watchdog declared a stall
    USER_ERROR = "user_error"  # bad config or data: restarting cannot help
    NCCL = "nccl"  # NCCL failed: a collective timed out, a peer or the network failed (data["nccl"] says which)
    GPU = "gpu"  # a CUDA error or a GPU hardware fault (ECC/Xid): its node is avoided on restart
    SDC = "sdc"  # replicas disagree (silent data corruption): restart before it, without the suspects' nodes
    RESIZE = "resize"  # planned: capacity came back, regrow the group at a checkpoint
    STRAGGLER = "straggler"  # planned: replace a straggling rank at a checkpoint (hang.straggler_action)


class Decision(str, Enum):
    RESTART = "restart"
    RAISE = "raise"


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str
    rank: int | None = None
    node_id: str | None = None
    step: int | None = None  # last step the failing group completed, if known
    traceback: str | None = None
    data: dict = field(default_factory=dict)

    @property
    def planned(self) -> bool:
        """Ended on purpose, at a checkpoint: nothing was lost."""
        return self.kind in (FailureKind.RESIZE, FailureKind.STRAGGLER)


class GroupError(Exception):
    """Raised by the worker group when it failed; `failure` says which rank, where and why."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


@dataclass
class RestartPolicy:
    max_restarts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    on_nonfinite: OnNonFinite = OnNonFinite.FAIL

    def decide(self, failure: Failure, restarts_done: int) -> Decision:
        if failure.kind is FailureKind.USER_ERROR:
            return Decision.RAISE
        if failure.kind is FailureKind.RESIZE:
            return Decision.RESTART  # not a failure: never counted against max_restarts
        if failure.kind is FailureKind.NON_FINITE and self.on_nonfinite is OnNonFinite.FAIL:
            return Decision.RAISE
        return Decision.RESTART if restarts_done < self.max_restarts else Decision.RAISE

    def counts(self, failure: Failure) -> bool:
        """Whether a restart after this failure uses up one of max_restarts."""
        return failure.kind is not FailureKind.RESIZE

    def may_replace_straggler(self, restarts_done: int) -> bool:
        """A replacement is a restart: only while the budget lasts."""
        return restarts_done < self.max_restarts

    def delay_s(self, streak: int, rng: random.Random | None = None) -> float:
        """`streak`: failures since the group last recovered (made a step after a restart). No wait
        for the first (a lone failure should cost as little as possible); then exponential backoff
        with jitter against crash loops: 1, 2, 4 ... s (x 0.5-1.0), capped."""
        if streak == 0:
            return 0.0
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (streak - 1))
        return base * (0.5 + 0.5 * (rng or random).random())


class ElasticPolicy:
    """scaling.min_workers: start with the largest group that fits (and divides the global batch,
    so the data order stays the same); once capacity for the full group is back, regrow at the
    next committed checkpoint so no step is lost."""

    def __init__(self, *, num_workers: int, min_workers: int | None, global_batch: int | None, cpus: float, gpus: float,
                 check_every_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.num_workers, self.min_workers, self.global_batch = num_workers, min_workers, global_batch
        self.cpus, self.gpus = cpus, gpus
        self.check_every_s, self.clock = check_every_s, clock
        self.next_check = 0.0
        self.grow_after: int | None = None  # regrow once a checkpoint newer than this commits

    def sizes(self) -> list[int]:
        """Group sizes to try, largest first."""
        if self.min_workers is None:
            return [self.num_workers]
        return [n for n in range(self.num_workers, self.min_workers - 1, -1)
                if self.global_batch is None or self.global_batch % n == 0]  # None: the user's loop sizes its batches

    def check(self, world: int, free: Callable[[], dict], latest: Callable[[], int | None]) -> tuple[str | None, Failure | None]:
        """(a note to show, a RESIZE to act on); looks at most every check_every_s."""
        now = self.clock()
        if world >= self.num_workers or now < self.next_check:
            return None, None
        self.next_check = now + self.check_every_s
        resources = free()
        missing = self.num_workers - world
        if resources.get("CPU", 0) < missing * self.cpus or resources.get("GPU", 0) < missing * self.gpus:
            self.grow_after = None
            return None, None
        step = latest() or 0
        if self.grow_after is None:
            self.grow_after = step
            return f"elastic: capacity for {self.num_workers} workers is back; regrowing at the next checkpoint", None
        if step > self.grow_after:
            self.grow_after = None
            return None, Failure(FailureKind.RESIZE, f"regrowing from {world} to {self.num_workers} workers "
                                 f"at the checkpoint of step {step}", step=step)
        return None, None


class StragglerPolicy:
    """hang.straggler_action=restart: a straggler reported by the metrics stream is replaced at the
    next committed checkpoint (no work lost), away from its node when the cluster has room."""

    def __init__(self, action: StragglerAction, *, check_every_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.action, self.check_every_s, self.clock = action, check_every_s, clock
        self.pending: dict | None = None
        self.next_check = 0.0

    def new_group(self) -> None:
        self.pending = None  # a replacement planned for a group does not outlive it

    def on_alert(self, alert: dict, node: str | None, *, budget_left: bool, latest: int | None,
                 max_restarts: int) -> str | None:
        """A straggler alert: plan its replacement. Returns a note to show, or None."""
        if self.action is not StragglerAction.RESTART or self.pending is not None:
            return None
        rank = alert["rank"]
        if not budget_left:
            return (f"straggler rank {rank} not replaced: fault_tolerance.max_restarts={max_restarts} "
                    "is used up; going on")
        self.pending = {"event": (alert["id"], alert["data"]), "rank": rank, "node": node, "after": latest or 0}
        return f"straggler rank {rank} (node {node_label(node)}) will be replaced at the next checkpoint"

    def check(self, latest: Callable[[], int | None]) -> Failure | None:
        """The replacement, once a checkpoint newer than the alert has committed."""
        r = self.pending
        if r is None or self.clock() < self.next_check:
            return None
        self.next_check = self.clock() + self.check_every_s
        step = latest() or 0
        if step <= r["after"]:
            return None
        self.pending = None
        return Failure(FailureKind.STRAGGLER, f"replacing straggler rank {r['rank']} on node "
                       f"{node_label(r['node'])} at the checkpoint of step {step}", rank=r["rank"],
                       node_id=r["node"], step=step, data={"event": r["event"]})
