"""How a rank talks to the coordinator: directly (tests, one process) or through a Ray handle.

The writer only sees `call(method, *args, **kwargs)`, so it never imports Ray.
"""

from __future__ import annotations

import threading
from typing import Any


class LocalClient:
    """Calls a coordinator object in this process. Thread-safe enough for tests: every
    coordinator method is a few dict operations, guarded by one lock."""

    def __init__(self, coordinator):
        self.coordinator = coordinator
        self.lock = threading.Lock()

    def call(self, method: str, *args, **kwargs) -> Any:
        with self.lock:
            return getattr(self.coordinator, method)(*args, **kwargs)


class RayClient:
    """Calls the coordinator actor and waits for the answer. A slot request ("acquire") waits in
    the coordinator until a slot is free, up to `slot_wait_s`, instead of returning None at once:
    the writer asks again only after that, so ranks do not poll the actor (one call per write)."""

    def __init__(self, handle, timeout_s: float = 60.0, slot_wait_s: float = 20.0):
        self.handle = handle
        self.timeout_s = timeout_s
        self.slot_wait_s = min(slot_wait_s, timeout_s / 2)  # the answer must come back before ray.get gives up

    def call(self, method: str, *args, **kwargs) -> Any:
        import ray

        if method == "acquire":
            return ray.get(self.handle.acquire_wait.remote(*args, timeout_s=self.slot_wait_s), timeout=self.timeout_s)
        return ray.get(getattr(self.handle, method).remote(*args, **kwargs), timeout=self.timeout_s)
