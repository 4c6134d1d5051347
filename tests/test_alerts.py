"""Anomaly detection, alert delivery to a webhook (a real HTTP server on loopback), events in the store."""

from __future__ import annotations

import http.server
import json
import math
import threading
import time

import numpy as np
import pytest

from actors.metrics_actor import MetricsActor
from actors.webhook import WebhookPoster
from orchestrator.anomaly import AnomalyDetector
from orchestrator.store import Store


def cols(key, steps, values):
    return {key: (np.asarray(steps), np.asarray(values, dtype=float))}


def feed(det, rank, key, values, start=0):
    alerts = []
    for i, v in enumerate(values):
        alerts += det.observe(rank, cols(key, [start + i], [v]))
    return alerts


def noisy_loss(n, seed=0):
    rng = np.random.default_rng(seed)
    return list(3.0 - np.linspace(0, 1, n) + rng.normal(0, 0.02, n))


def test_loss_spike_found_once_at_its_step_and_not_in_normal_noise():
    det = AnomalyDetector()
    values = noisy_loss(200)
    assert feed(det, 0, "train/loss", values) == []  # a falling, noisy curve is not an anomaly
    values[150] = 9.0
    det = AnomalyDetector()
    alerts = feed(det, 0, "train/loss", values)
    assert [(a.kind, a.step, a.rank) for a in alerts] == [("loss_spike", 150, 0)]
    assert alerts[0].data["z"] > 6


def test_non_finite_loss_is_an_error_reported_once_across_ranks():
    det = AnomalyDetector()
    a0 = det.observe(0, cols("train/loss", [5], [math.nan]))
    a1 = det.observe(1, cols("train/loss", [5], [math.inf]))
    assert [(a.kind, a.severity) for a in a0] == [("non_finite_loss", "error")] and a1 == []


def test_grad_norm_explosion_and_throughput_drop():
    det = AnomalyDetector()
    alerts = feed(det, 0, "train/grad_norm", [1.0 + 0.01 * i for i in range(30)] + [50.0])
    assert [a.kind for a in alerts] == ["grad_norm_explosion"]
    det = AnomalyDetector()
    one_slow = [1000.0] * 25 + [300.0] + [1000.0] * 5  # a single slow step (eval, checkpoint) is fine
    assert feed(det, 0, "train/tokens_per_s", one_slow) == []
    alerts = feed(det, 0, "train/tokens_per_s", [300.0] * 6, start=31)
    assert [(a.kind, a.step) for a in alerts] == [("throughput_drop", 35)]  # the fifth slow step in a row


def test_straggler_named_by_rank_with_a_score():
    """Identical timings (no jitter): the noise floor applies and one step's evidence is capped, so
    the alert comes min_steps (8) steps after verdicts start (once the noise scale has settled),
    once, not once per step."""
    det = AnomalyDetector()
    alerts = []
    for step in range(60):
        for rank in range(4):
            t = 0.30 if rank == 2 else 0.10
            alerts += det.observe(rank, cols("health/compute_s", [step], [t]))
    assert [(a.kind, a.rank) for a in alerts] == [("straggler", 2)]
    assert alerts[0].data["score"] == pytest.approx(1 / 3)
    assert det.t.straggler.min_history + det.t.straggler.min_steps - 1 <= alerts[0].step < 45
    assert det.scores[2][1] == pytest.approx(1 / 3) and det.scores[0][1] == pytest.approx(1.0)


class Hook(http.server.BaseHTTPRequestHandler):
    received: list = []
    fail_first = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if Hook.fail_first > 0:
            Hook.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        Hook.received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_server():
    Hook.received, Hook.fail_first = [], 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts"
    server.shutdown()
    server.server_close()


def test_webhook_retries_until_delivered(webhook_server):
    poster = WebhookPoster(webhook_server, attempts=5, backoff_s=0.01)
    poster.post({"kind": "loss_spike", "step": 3})
    poster.close(timeout_s=60)  # returns once delivered; generous for a busy machine
    assert Hook.received == [{"kind": "loss_spike", "step": 3}] and poster.delivered == 1


def test_webhook_gives_up_after_bounded_attempts():
    poster = WebhookPoster("http://127.0.0.1:9/nothing-listens", attempts=3, backoff_s=0.001, timeout_s=1)
    poster.post({"kind": "x"})
    poster.close(timeout_s=60)
    assert poster.failed == 1 and poster.delivered == 0


def test_metrics_actor_records_alerts_in_store_queue_and_webhook(tmp_path, webhook_server):
    Hook.fail_first = 0
    actor = MetricsActor("run1", str(tmp_path), open_store=Store, detector=AnomalyDetector(), alert_webhook=webhook_server)
    values = noisy_loss(60)
    values[40] = 20.0
    for step, v in enumerate(values):
        actor.log_columns(0, step + 1, cols("train/loss", [step], [v]))
    alerts = actor.take_alerts()
    assert [(a["kind"], a["step"]) for a in alerts] == [("loss_spike", 40)] and actor.take_alerts() == []
    actor.close()
    events = Store(tmp_path).events("run1")
    alerts_stored = [e for e in events if not e["kind"].startswith("webhook_")]
    assert [(e["kind"], e["step"], e["rank"], e["severity"]) for e in alerts_stored] == [("loss_spike", 40, 0, "warning")]
    # the delivery itself is recorded too, once the poster reports it (close() waits for it)
    assert [e["kind"] for e in events if e["kind"].startswith("webhook_")] in ([], ["webhook_delivered"])
    deadline = time.monotonic() + 60
    while not Hook.received and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Hook.received[0]["kind"] == "loss_spike" and Hook.received[0]["run"] == "run1"
