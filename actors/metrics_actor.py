"""One per run: receives batched per-rank metrics and writes them to the tracking store.

It also keeps each rank's latest values so the driver can show progress without a query.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from actors.prometheus_export import Exporter
from actors.webhook import WebhookPoster
from orchestrator.anomaly import AnomalyDetector
from orchestrator.series import columns as to_columns
from orchestrator.store import Store


class MetricsActor:
    def __init__(self, run_id: str, store_root: str, attempt: int = 0, *,
                 prometheus_host: str | None = None, prometheus_port: int | None = None,
                 alert_webhook: str | None = None):
        self.run_id = run_id
        self.attempt = attempt
        self.store = Store(store_root)
        self.latest: dict[int, dict[str, tuple[int, float]]] = {}
        self.step_times: list[float] = []
        self.exporter = Exporter(run_id, host=prometheus_host, port=prometheus_port)
        self.detector = AnomalyDetector()
        self.new_alerts: list[dict] = []  # not yet shown by the driver
        self.webhook = WebhookPoster(alert_webhook) if alert_webhook else None

    def set_attempt(self, attempt: int) -> None:
        """A new worker group: its points are stored as a new attempt; progress starts afresh."""
        self.attempt = attempt
        self.latest = {}
        self.step_times = []
        self.detector.new_group()

    def prometheus_address(self) -> str | None:
        """host:port of the /metrics endpoint, or None when disabled."""
        return self.exporter.address

    def log(self, rank: int, points: list[tuple[str, int, float, float]]) -> int:
        """Row-shaped points (key, step, value, time) from one rank. Returns how many were stored."""
        return self.log_columns(rank, None, to_columns((key, step, value) for key, step, value, _ in points))

    def log_columns(self, rank: int, seq: int | None, columns: dict, dropped: int = 0) -> int:
        """One batch from a rank's MetricSender: {key: (steps, values)}. Applied once per seq."""
        if dropped:
            step = max((int(s[-1]) for s, _ in columns.values() if len(s)), default=0)
            columns = {**columns, "telemetry/dropped_points": (np.array([step]), np.array([float(dropped)]))}
        stored = self.store.points.append(self.run_id, rank, self.attempt, columns, seq=seq)
        if stored:
            self._remember(rank, columns)
            for a in self.detector.observe(rank, columns):
                self.alert(a.kind, a.severity, a.message, step=a.step, rank=a.rank, data=a.data)
            if rank in self.detector.scores:  # the straggler score, per rank, next to its inputs
                step, score = self.detector.scores.pop(rank)
                self.store.points.append(self.run_id, rank, self.attempt,
                                         {"health/straggler_score": (np.array([step]), np.array([score]))})
        return stored

    def alert(self, kind: str, severity: str, message: str, *, step: int | None = None, rank: int | None = None,
              data: dict | None = None) -> None:
        """Record an event: in the store, in the driver's live output, and at the webhook if set."""
        event_id = self.store.add_event(self.run_id, kind=kind, severity=severity, message=message, step=step,
                                        rank=rank, data=data)
        event = {"id": event_id, "run": self.run_id, "kind": kind, "severity": severity, "message": message, "step": step,
                 "rank": rank, "data": data or {}, "time": time.time()}
        self.new_alerts.append(event)
        if self.webhook:
            self.webhook.post(event)

    def poll(self) -> dict:
        """What the driver's watch loop needs, in one call: progress and the alerts not yet shown."""
        return {"progress": self.progress(), "alerts": self.take_alerts()}

    def take_alerts(self) -> list[dict]:
        alerts, self.new_alerts = self.new_alerts, []
        return alerts

    def _remember(self, rank: int, columns: dict) -> None:
        latest = self.latest.setdefault(rank, {})
        for key, (steps, values) in columns.items():
            if len(steps):
                latest[key] = (int(steps[-1]), float(values[-1]))
        if rank == 0 and "train/step_time_s" in columns:
            self.step_times = (self.step_times + [float(v) for v in columns["train/step_time_s"][1]])[-50:]
        p = self.progress()
        self.exporter.update(
            p.get("step", -1),
            {k: v for k, v in p.items() if "/" in k},
            {r: {k: v for k, (_, v) in vals.items()} for r, vals in self.latest.items()},
        )

    def progress(self) -> dict:
        """The slowest rank's step and the mean of the ranks' latest values."""
        if not self.latest:
            return {}
        steps = [v.get("train/loss", (-1, 0))[0] for v in self.latest.values()]
        out: dict = {"step": min(steps), "max_step": max(steps)}
        for key in ("train/loss", "train/tokens_per_s", "train/lr", "eval/loss"):
            vals = [v[key][1] for v in self.latest.values() if key in v]
            if vals:
                out[key] = sum(vals) / len(vals)
        if self.step_times:
            out["median_step_time_s"] = statistics.median(self.step_times)
        return out

    def close(self) -> None:
        if self.webhook:
            self.webhook.close()
        self.exporter.close()
        self.store.close()
