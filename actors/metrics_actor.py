"""One per run: receives batched per-rank metrics and writes them to the tracking store.

It also keeps each rank's latest values so the driver can show progress without a query.
The ranks' senders call `log_columns_grouped`: batches that arrive while a transaction is being
written go into the next one together, so a thousand ranks' flushes cost a few commits, not a
thousand (bench/control_plane.py measured the difference).
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import time

import numpy as np

from actors.prometheus_export import Exporter
from actors.webhook import WebhookPoster, as_event
from common.errors import StoreFull


class MetricsActor:
    def __init__(self, run_id: str, store_root: str, attempt: int = 0, *, open_store, detector,
                 prometheus_host: str | None = None, prometheus_port: int | None = None,
                 alert_webhook: str | None = None):
        """open_store(store_root) -> the tracking store (orchestrator.store.Store); detector: the
        anomaly detector the batches go through (orchestrator.anomaly.AnomalyDetector). Both come
        in from the driver, so this shell imports nothing of the orchestrator's."""
        self.run_id = run_id
        self.store = open_store(store_root)
        # Ray restarts this actor with these same arguments, and the driver's set_attempt is not
        # repeated: the attempt in progress is the latest the driver recorded (before set_attempt)
        self.attempt = max(attempt, self.store.latest_attempt(run_id) or 0)
        self.full = False  # a store_full event is out; the next write that succeeds re-arms it
        self.latest: dict[int, dict[str, tuple[int, float]]] = {}
        self.step_times: list[float] = []
        self.exporter = Exporter(run_id, host=prometheus_host, port=prometheus_port)
        # a private copy: Ray hands arguments over as read-only numpy views, and the detector writes into its arrays
        self.detector = copy.deepcopy(detector)
        self.queue: list[tuple[tuple, asyncio.Future]] = []  # grouped batches waiting for the next transaction
        self.writing = False
        self.new_alerts: list[dict] = []  # not yet shown by the driver
        self.new_lines: list[str] = []  # rank 0's output lines not yet shown by the driver
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

    def log_columns(self, rank: int, seq: int | None, columns: dict, dropped: int = 0) -> int:
        """One batch from a rank's MetricSender: {key: (steps, values)}. Applied once per seq,
        together with the events it raises: one transaction, so neither survives without the other."""
        return self._write([(rank, seq, columns, dropped)])[0]

    async def log_columns_grouped(self, rank: int, seq: int | None, columns: dict, dropped: int = 0) -> int:
        """log_columns, written in one transaction with the other batches waiting at that moment."""
        done = asyncio.get_running_loop().create_future()
        self.queue.append(((rank, seq, columns, dropped), done))
        if not self.writing:
            self.writing = True
            asyncio.ensure_future(self._drain())
        return await done

    async def log_columns_many(self, batches: list[tuple]) -> list[int]:
        """The batches (rank, seq, columns, dropped) of a node's ranks in one call, written like
        log_columns_grouped's. If any fails, its error is raised once all were tried: the caller
        sends them all again, and those already stored are skipped by their seq."""
        results = await asyncio.gather(*(self.log_columns_grouped(*batch) for batch in batches),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _drain(self) -> None:
        try:
            while self.queue:
                await asyncio.sleep(0)  # the calls delivered while the last group was written join this one
                group, self.queue = self.queue, []
                self._write_group(group)
        finally:
            self.writing = False

    def _write_group(self, group: list[tuple[tuple, asyncio.Future]]) -> None:
        try:
            results = self._write([batch for batch, _ in group])
        except Exception as e:
            if len(group) == 1:
                results = [e]
            else:  # one at a time: a batch that cannot be stored fails alone, the others go in
                results = []
                for batch, _ in group:
                    try:
                        results.append(self._write([batch])[0])
                    except Exception as one:
                        results.append(one)
        for (_, done), result in zip(group, results, strict=True):
            if done.cancelled():
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)

    def _write(self, batches: list[tuple]) -> list[int]:
        """Store batches (rank, seq, columns, dropped) and the events they raise in one transaction;
        returns the points stored of each (0: a batch already applied)."""
        cooldowns = dict(self.detector.last_alert)  # a batch that is not stored must alert again when re-sent
        points = self.store.points
        # a local store writes every rank's batch in one go; a RemoteStore sends each batch with
        # its events right after it (the server skips the events of a batch it had applied)
        together = hasattr(points, "append_many")
        applied, scores = [], []
        try:
            with self.store.transaction():
                batches = [(rank, seq, self._with_dropped(columns, dropped), dropped)
                           for rank, seq, columns, dropped in batches]
                if together:
                    counts = points.append_many([(self.run_id, rank, self.attempt, columns, seq)
                                                 for rank, seq, columns, _ in batches])
                for i, (rank, seq, columns, _) in enumerate(batches):
                    stored = counts[i] if together else points.append(self.run_id, rank, self.attempt, columns, seq=seq)
                    events = []
                    if stored:
                        events = [self._record(a.kind, a.severity, a.message, step=a.step, rank=a.rank, data=a.data)
                                  for a in self.detector.observe(rank, columns)]
                        if rank in self.detector.scores:  # the straggler score, per rank, next to its inputs
                            step, score = self.detector.scores.pop(rank)
                            score_cols = {"health/straggler_score": (np.array([step]), np.array([score]))}
                            if together:
                                scores.append((self.run_id, rank, self.attempt, score_cols, None))
                            else:
                                points.append(self.run_id, rank, self.attempt, score_cols)
                    applied.append((rank, columns, stored, events))
                if scores:
                    points.append_many(scores)
        except BaseException as e:
            self.detector.last_alert = cooldowns
            if isinstance(e, StoreFull) and len(batches) == 1:
                self._store_full(e, batches[0][0], batches[0][2])
            raise
        for rank, columns, stored, _ in applied:
            if stored:
                self.full = False
                self._remember(rank, columns)
        self._export({rank for rank, _, stored, _ in applied if stored})
        for *_, events in applied:
            for event in events:
                self._announce(event)
        return [stored for _, _, stored, _ in applied]

    @staticmethod
    def _with_dropped(columns: dict, dropped: int) -> dict:
        """The points a sender had to drop, counted in a series of their own."""
        if not dropped:
            return columns
        step = max((int(s[-1]) for s, _ in columns.values() if len(s)), default=0)
        return {**columns, "telemetry/dropped_points": (np.array([step]), np.array([float(dropped)]))}

    def alert(self, kind: str, severity: str, message: str, *, step: int | None = None, rank: int | None = None,
              data: dict | None = None) -> None:
        """Record an event: in the store, in the driver's live output, and at the webhook if set."""
        self._announce(self._record(kind, severity, message, step=step, rank=rank, data=data))

    def _record(self, kind: str, severity: str, message: str, *, step: int | None = None, rank: int | None = None,
                data: dict | None = None, store: bool = True) -> dict:
        event_id = (self.store.add_event(self.run_id, kind=kind, severity=severity, message=message, step=step,
                                         rank=rank, data=data) if store else None)
        return {"id": event_id, "run": self.run_id, "kind": kind, "severity": severity, "message": message,
                "step": step, "rank": rank, "data": data or {}, "time": time.time()}

    def _announce(self, event: dict) -> None:
        """Once stored (or when it cannot be): the driver's live output and the webhook."""
        self.new_alerts.append(event)
        if self.webhook:
            self.webhook.post(event)

    def _store_full(self, error: StoreFull, rank: int, columns: dict) -> None:
        """Once per episode, not per re-sent batch: an event if a row still fits, and always the
        driver's output and the webhook. The sender keeps the batch and sends it again."""
        if self.full:
            return
        self.full = True
        step = max((int(s[-1]) for s, _ in columns.values() if len(s)), default=None)
        points = sum(len(s) for s, _ in columns.values())
        kw = dict(step=step, rank=rank, data={"points_waiting": points, "attempt": self.attempt})
        try:
            event = self._record("store_full", "error", str(error), **kw)
        except Exception:  # no room even for the event
            event = self._record("store_full", "error", str(error), store=False, **kw)
        self._announce(event)

    def poll(self) -> dict:
        """What the driver's watch loop needs, in one call: progress, the alerts and rank 0's
        output lines not yet shown."""
        self._record_deliveries()
        lines, self.new_lines = self.new_lines, []
        return {"progress": self.progress(), "alerts": self.take_alerts(), "lines": lines}

    def log_lines(self, rank: int, lines: list[tuple[float, str, str]]) -> None:
        """A rank's output lines (time, stream, text), stored with the run; rank 0's also shown live."""
        self.store.logs.add(self.run_id, self.attempt, rank, lines)
        if rank == 0:
            self.new_lines.extend(text for _, _, text in lines)
            del self.new_lines[:-1000]  # a driver that stopped polling must not make this grow forever

    def _record_deliveries(self) -> None:
        """Webhook deliveries and failures become events; stored directly, never announced, so a
        failed delivery is not posted to the webhook again."""
        for result in self.webhook.take_results() if self.webhook else []:
            try:
                self.store.add_event(self.run_id, **as_event(result))
            except Exception:  # a full store: the delivery record is the least of it
                pass

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

    def _export(self, ranks: set[int]) -> None:
        """The Prometheus gauges of the run and of the ranks that sent something (the others keep
        theirs: setting every rank's on every batch cost a thousand ranks a quadratic bill)."""
        if not ranks:
            return
        p = self.progress()
        self.exporter.update(
            p.get("step", -1),
            {k: v for k, v in p.items() if "/" in k},
            {r: {k: v for k, (_, v) in self.latest[r].items()} for r in ranks},
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
            self._record_deliveries()
        self.exporter.close()
        self.store.close()
