"""Retries with exponential backoff and full jitter, for throttling and transient errors only.

Throttling (503 SlowDown, 429), timeouts and dropped connections are worth retrying; a missing
bucket or a permission error is not, and retrying it would only delay the failure.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Errors that retrying cannot fix. Everything else (OSError from s3fs/botocore for 5xx and
# throttling, timeouts, resets, truncated bodies) is treated as transient.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
             ValueError, TypeError, KeyError, AttributeError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, PERMANENT)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**attempt)], so retrying ranks spread out."""
    return rng.uniform(0, min(max_s, base_s * (2 ** attempt)))


def with_retries(fn: Callable[[], T], *, retries: int, backoff_s: float, max_backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
                 on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """Call fn; on a transient error wait and try again, at most `retries` more times."""
    rng = rng or random.Random()
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not is_transient(e):
                raise
            delay = backoff_delay(attempt, backoff_s, max_backoff_s, rng)
            if on_retry is not None:
                on_retry(attempt + 1, e, delay)
            sleep(delay)
    raise AssertionError("unreachable")
