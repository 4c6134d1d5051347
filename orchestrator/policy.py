"""What to do when a worker group fails: a pure decision, so the controller can be tested one
failure at a time."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum


class FailureKind(str, Enum):
    EXCEPTION = "exception"  # a rank raised (its traceback is kept)
    DIED = "died"  # a worker process is gone (SIGKILL, OOM killer)
    NODE_LOST = "node_lost"  # the node under a worker left the cluster
    NON_FINITE = "non_finite_loss"
    HANG = "hang"  # the watchdog declared a stall
    USER_ERROR = "user_error"  # bad config or data: restarting cannot help
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


@dataclass
class RestartPolicy:
    max_restarts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def decide(self, failure: Failure, restarts_done: int) -> Decision:
        if failure.kind is FailureKind.USER_ERROR:
            return Decision.RAISE
        if failure.kind is FailureKind.RESIZE:
            return Decision.RESTART  # not a failure: never counted against max_restarts
        return Decision.RESTART if restarts_done < self.max_restarts else Decision.RAISE

    def delay_s(self, restarts_done: int, rng: random.Random | None = None) -> float:
        """No wait before the first restart (a lone failure should cost as little as possible);
        then exponential backoff with jitter against crash loops: 1, 2, 4 ... s (x 0.5-1.0), capped."""
        if restarts_done == 0:
            return 0.0
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (restarts_done - 1))
        return base * (0.5 + 0.5 * (rng or random).random())
