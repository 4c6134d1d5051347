"""The `checkpoint` config section, owned by the checkpointing component."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from common.schema import MAX_SECONDS, MAX_STEPS, option


class BestMode(str, Enum):
    MIN = "min"  # lower is better (a loss)
    MAX = "max"  # higher is better (an accuracy)


@dataclass
class CheckpointConfig:
    uri: str | None = option(None, help="any fsspec URL; default $ORCHESTRATOR_HOME/checkpoints/RUN_ID")
    every_steps: int = option(0, min=0, max=MAX_STEPS, help="0 saves only at the end")
    memory_every_steps: int = option(0, min=0, max=MAX_STEPS,
                                     help="0: off. Also snapshot every rank's state to host memory every N steps, kept "
                                          "by keepers on its own node and the next (any one node may be lost) and used "
                                          "first on recovery; independent of "
                                          "every_steps, usually a fraction of it (durable checkpoints still survive "
                                          "losing every node)")
    memory_limit_mb: float = option(2048.0, min=1, max=2**30,
                                    help="host memory one rank's snapshots may take: its own copy while sent plus the "
                                         "two newest each of its two keepers holds (5x a snapshot; 3x on one node); "
                                         "over it snapshots are skipped")
    storage_options: dict[str, Any] = option({}, help="passed to fsspec, e.g. {client_kwargs: {endpoint_url: ...}}")
    max_concurrent_writes: int = option(8, min=1, max=100_000, help="write requests in flight across the whole run")
    per_node_writes: int = option(2, min=1, max=10_000, help="write requests in flight per node")
    start_jitter_s: float = option(0.05, min=0, max=3600, help="random delay before asking for a write slot")
    slot_lease_s: float = option(600.0, min=1, max=MAX_SECONDS, help="a slot not released within this is reclaimed (dead rank)")
    retries: int = option(6, min=0, max=1000, help="retries per file on throttling and transient errors")
    backoff_s: float = option(0.2, min=0, max=3600, help="first retry delay; doubles each time, with jitter")
    max_backoff_s: float = option(10.0, min=0, max=MAX_SECONDS)
    commit_timeout_s: float = option(600.0, min=1, max=MAX_SECONDS, help="rank 0 waits this long for every rank's shards")
    keep_last: int = option(3, min=1, max=1_000_000, help="always keep the newest N committed checkpoints")
    keep_every: int = option(0, min=0, max=MAX_STEPS, help="also keep steps divisible by this (0: none)")
    keep_best: str | None = option(None, help="also keep the best checkpoint by this metric, e.g. eval/loss")
    keep_best_mode: BestMode = option(BestMode.MIN)
