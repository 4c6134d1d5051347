"""Alert webhook delivery against real HTTP servers on 127.0.0.1: every attempt ends by its
deadline (a slow-drip server included), nothing stops the delivery thread, and every delivery
and failure is kept for the metrics actor to store as an event. No Ray."""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time

import pytest

from actors import webhook
from actors.webhook import WebhookPoster, as_event

WAIT_S = 90  # generous: a busy shared 2-core machine


def wait_results(poster: WebhookPoster, n: int) -> list[dict]:
    results: list[dict] = []
    deadline = time.monotonic() + WAIT_S
    while len(results) < n and time.monotonic() < deadline:
        results += poster.take_results()
        time.sleep(0.05)
    return results


class Answer(http.server.BaseHTTPRequestHandler):
    status = 200
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Answer.seen.append((body, self.headers.get("Authorization")))
        self.send_response(Answer.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Answer.status, Answer.seen = 200, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_port
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def slow_drip():
    """Reads the request, then sends a status line one byte every 0.5 s, never finishing it."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def drip(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.5)
            try:
                conn.recv(65536)
            except OSError:
                pass
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(0.5):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up: what we want

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def test_delivery_is_recorded_with_its_status(server):
    poster = WebhookPoster(f"http://127.0.0.1:{server}/hook", attempts=2, backoff_s=0.01)
    poster.post({"kind": "loss_spike", "step": 7})
    [result] = wait_results(poster, 1)
    poster.close()
    assert result == {"ok": True, "status": 200, "error": None, "kind": "loss_spike", "step": 7, "attempts": 1}
    assert Answer.seen[0][0] == {"kind": "loss_spike", "step": 7}
    event = as_event(result)
    assert event["kind"] == "webhook_delivered" and event["severity"] == "info" and event["step"] == 7
    assert poster.take_results() == []  # drained


def test_http_errors_are_retried_then_recorded_as_a_failure(server):
    Answer.status = 500
    poster = WebhookPoster(f"http://127.0.0.1:{server}/hook", attempts=3, backoff_s=0.01)
    poster.post({"kind": "straggler", "step": 3})
    [result] = wait_results(poster, 1)
    poster.close()
    assert (result["ok"], result["status"], result["error"], result["attempts"]) == (False, 500, "HTTP 500", 3)
    assert len(Answer.seen) == 3
    event = as_event(result)
    assert event["kind"] == "webhook_failed" and event["severity"] == "warning"
    assert "straggler" in event["message"] and "HTTP 500" in event["message"] and "3 attempt" in event["message"]


def test_slow_drip_server_cannot_hold_an_attempt_past_its_deadline(slow_drip, server):
    # each byte comes well within the socket timeout: only the overall deadline ends the attempt
    poster = WebhookPoster(f"http://127.0.0.1:{slow_drip}/hook", attempts=1, timeout_s=2.0, deadline_s=3.0)
    poster.post({"kind": "stall", "step": 1})
    [result] = wait_results(poster, 1)
    assert result["ok"] is False and "TimeoutError" in result["error"] and "within 3 s" in result["error"]
    assert poster._thread.is_alive()  # and it goes on delivering
    poster.url = f"http://127.0.0.1:{server}/hook"
    poster.post({"kind": "after", "step": 2})
    [after] = wait_results(poster, 1)
    poster.close()
    assert after["ok"] is True and after["kind"] == "after"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://", "not a url", "http://[::1/x", "http://h:99999/x"])
def test_a_bad_url_is_a_recorded_failure_not_a_dead_thread(url):
    poster = WebhookPoster(url, attempts=2, backoff_s=0.001, timeout_s=1)
    poster.post({"kind": "one"})
    poster.post({"kind": "two"})
    results = wait_results(poster, 2)
    assert [r["kind"] for r in results] == ["one", "two"] and not any(r["ok"] for r in results)
    assert all(r["error"] for r in results) and poster._thread.is_alive()
    poster.close()
    assert poster.failed == 2


def test_an_unexpected_error_in_a_send_does_not_stop_later_alerts(server, monkeypatch):
    real = webhook.post_json
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TypeError("something nobody expected")
        return real(*args, **kwargs)

    monkeypatch.setattr(webhook, "post_json", flaky)
    poster = WebhookPoster(f"http://127.0.0.1:{server}/hook", attempts=1)
    poster.post({"kind": "first"})
    poster.post({"kind": "second"})
    results = wait_results(poster, 2)
    poster.close()
    assert [(r["kind"], r["ok"]) for r in results] == [("first", False), ("second", True)]
    assert "TypeError: something nobody expected" in results[0]["error"]


def test_credentials_in_the_url_become_basic_auth(server):
    poster = WebhookPoster(f"http://alice:s%40cret@127.0.0.1:{server}/hook", attempts=1)
    poster.post({"kind": "x"})
    [result] = wait_results(poster, 1)
    poster.close()
    assert result["ok"]
    assert Answer.seen[0][1] == "Basic " + base64.b64encode(b"alice:s@cret").decode()


def test_a_full_queue_is_recorded():
    release = threading.Event()
    poster = WebhookPoster("http://127.0.0.1:9/x", attempts=1, max_queue=1, sleep=lambda s: None)
    poster._deliver = lambda payload: release.wait(WAIT_S)  # hold the thread on the first alert
    for i in range(3):
        poster.post({"kind": f"a{i}"})
    release.set()
    poster.close()
    dropped = [r for r in poster.take_results() if r["error"] and "queue full" in r["error"]]
    assert dropped and all(not r["ok"] for r in dropped)


def test_results_fit_the_stores_events(server, tmp_path):
    """What the metrics actor does with them: Store.add_event(run, **as_event(result))."""
    from orchestrator.store import Store

    Answer.status = 503
    poster = WebhookPoster(f"http://127.0.0.1:{server}/hook", attempts=1)
    poster.post({"kind": "loss_spike", "step": 40})
    [result] = wait_results(poster, 1)
    poster.close()
    store = Store(tmp_path)
    store.create_run(run_id="r1", name="n", config={}, git_commit=None, host="h", command="c", world_size=1)
    store.add_event("r1", **as_event(result))
    [event] = store.events("r1")
    assert (event["kind"], event["severity"], event["step"]) == ("webhook_failed", "warning", 40)
    assert event["data"]["status"] == 503 and "HTTP 503" in event["message"]
    store.close()
