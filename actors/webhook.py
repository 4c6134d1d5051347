"""POSTs alerts as JSON to a webhook from a background thread, retrying with backoff.

Delivery is best effort and bounded: a queue of at most `max_queue` alerts, at most `attempts`
tries each, and each try ends by `deadline_s` however slowly the server answers (a socket
timeout alone is reset by every byte a slow-drip server sends). Nothing a server or a URL does
can stop the thread; every delivery and failure is kept for the owner to record
(`take_results()`, `as_event(result)`) and never reposted, so a broken webhook cannot feed itself.
"""

from __future__ import annotations

import base64
import collections
import http.client
import json
import queue
import random
import socket
import threading
import time
import urllib.parse


class WebhookPoster:
    def __init__(self, url: str, *, attempts: int = 5, backoff_s: float = 0.5, timeout_s: float = 5.0,
                 deadline_s: float = 15.0, max_queue: int = 1000, max_results: int = 1000, sleep=time.sleep):
        self.url = url
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s  # per socket operation (connect, each read)
        self.deadline_s = deadline_s  # per attempt, whole request and answer
        self.sleep = sleep
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.delivered = 0
        self.failed = 0
        self._results: collections.deque = collections.deque(maxlen=max_results)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
        self._thread.start()

    def post(self, payload: dict) -> None:
        try:
            self.queue.put_nowait(payload)
        except queue.Full:
            self._record(payload, ok=False, status=None, error="queue full: too many alerts waiting", attempts=0)

    def take_results(self) -> list[dict]:
        """Deliveries and failures since the last call: {ok, status, error, kind, step, attempts}."""
        with self._lock:
            results = list(self._results)
            self._results.clear()
        return results

    def _run(self) -> None:
        while True:
            payload = self.queue.get()
            try:
                if payload is None:
                    return
                self._deliver(payload)
            except Exception as e:  # noqa: BLE001 (a bug here must not end delivery of later alerts)
                self._record(payload, ok=False, status=None, error=f"{type(e).__name__}: {e}", attempts=0)
            finally:
                self.queue.task_done()

    def _deliver(self, payload: dict) -> None:
        body = json.dumps(payload, default=str).encode()
        status, error = None, None
        for attempt in range(1, self.attempts + 1):
            try:
                status = post_json(self.url, body, timeout_s=self.timeout_s, deadline_s=self.deadline_s)
                error = None if 200 <= status < 300 else f"HTTP {status}"
            except Exception as e:  # noqa: BLE001 (any failure of one attempt is retried, then recorded)
                status, error = None, _describe(e)
            if error is None:
                self._record(payload, ok=True, status=status, error=None, attempts=attempt)
                return
            if attempt < self.attempts:
                # exponential backoff with full jitter, so many runs do not retry in lockstep
                self.sleep(random.uniform(0, self.backoff_s * 2 ** (attempt - 1)))
        self._record(payload, ok=False, status=status, error=error, attempts=self.attempts)

    def _record(self, payload, *, ok: bool, status: int | None, error: str | None, attempts: int) -> None:
        payload = payload if isinstance(payload, dict) else {}
        result = {"ok": ok, "status": status, "error": error, "kind": payload.get("kind"),
                  "step": payload.get("step"), "attempts": attempts}
        with self._lock:
            if ok:
                self.delivered += 1
            else:
                self.failed += 1
            self._results.append(result)

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


def as_event(result: dict) -> dict:
    """A take_results() entry as keyword arguments for Store.add_event."""
    what = f"alert {result['kind']}" + (f" (step {result['step']})" if result.get("step") is not None else "")
    if result["ok"]:
        return {"kind": "webhook_delivered", "severity": "info", "step": result.get("step"),
                "message": f"{what} delivered to the webhook (HTTP {result['status']})", "data": result}
    tries = f" after {result['attempts']} attempt(s)" if result.get("attempts") else ""
    return {"kind": "webhook_failed", "severity": "warning", "step": result.get("step"),
            "message": f"{what} not delivered to the webhook{tries}: {result['error']}", "data": result}


def post_json(url: str, body: bytes, *, timeout_s: float, deadline_s: float) -> int:
    """POST `body` to an http(s) URL; the answer's status. Raises on any failure, and by
    `deadline_s` at the latest: a timer shuts the socket down, which ends any read in progress."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL with a host")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=min(timeout_s, deadline_s))
    headers = {"Content-Type": "application/json", "User-Agent": "orchestrator-alerts"}
    if parts.username is not None:  # https://user:pass@host/... -> basic auth, never sent in the path
        creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(creds.encode()).decode()
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(deadline_s, cut)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        if expired.is_set():  # the timer fired before there was a socket to shut down
            raise TimeoutError
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers=headers)
        return conn.getresponse().status  # the status is the answer; the body is not read
    except Exception:
        if expired.is_set():
            raise TimeoutError(f"no answer within {deadline_s:g} s") from None
        raise
    finally:
        timer.cancel()
        conn.close()


def _describe(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
