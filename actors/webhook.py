"""POSTs alerts as JSON to a webhook from a background thread, retrying with backoff.

Delivery is best effort and bounded: a queue of at most `max_queue` alerts, at most `attempts`
tries each; what cannot be delivered is counted, never allowed to stall the metrics actor.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import urllib.error
import urllib.request


class WebhookPoster:
    def __init__(self, url: str, *, attempts: int = 5, backoff_s: float = 0.5, timeout_s: float = 5.0,
                 max_queue: int = 1000, sleep=time.sleep):
        self.url = url
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.sleep = sleep
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
        self._thread.start()

    def post(self, payload: dict) -> None:
        try:
            self.queue.put_nowait(payload)
        except queue.Full:
            self.failed += 1

    def _run(self) -> None:
        while True:
            payload = self.queue.get()
            if payload is None:
                return
            if self._send(payload):
                self.delivered += 1
            else:
                self.failed += 1
            self.queue.task_done()

    def _send(self, payload: dict) -> bool:
        body = json.dumps(payload).encode()
        for attempt in range(self.attempts):
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    if 200 <= resp.status < 300:
                        return True
            except (urllib.error.URLError, OSError, ValueError):
                pass
            # exponential backoff with full jitter, so many runs do not retry in lockstep
            self.sleep(random.uniform(0, self.backoff_s * 2**attempt))
        return False

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (bounded by timeout_s), then stop the thread."""
        deadline = time.monotonic() + timeout_s
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
