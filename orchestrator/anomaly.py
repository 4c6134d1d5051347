"""Anomaly detection on the metric stream: pure logic, fed batch by batch by the metrics actor.

Signals (per rank, deduplicated across ranks so 64 ranks do not raise 64 alerts):
  non_finite_loss      train/loss is NaN or inf
  loss_spike           robust z-score of train/loss against a recent window (median / MAD)
  grad_norm_explosion  train/grad_norm many times its recent median
  throughput_drop      train/tokens_per_s below a fraction of its recent median, several steps running
  straggler            a rank computes slower than the other ranks (waits in collectives excluded):
                       orchestrator/hang/stragglers.py, one alert per slow spell
  checkpoint_failed    a ckpt/failed point (the checkpoint writer logs one per failed checkpoint)
"""

from __future__ import annotations

import collections
import math
import statistics
from dataclasses import dataclass, field

from orchestrator.hang.stragglers import StragglerConfig, StragglerDetector


@dataclass(frozen=True)
class Alert:
    kind: str
    severity: str  # "warning" | "error"
    step: int
    rank: int
    message: str
    data: dict = field(default_factory=dict)


@dataclass
class Thresholds:
    window: int = 50
    min_history: int = 20  # early training is noisy: judge against a settled window
    spike_z: float = 6.0
    grad_ratio: float = 10.0
    throughput_drop: float = 0.5
    throughput_steps: int = 5
    cooldown_steps: int = 20
    straggler: StragglerConfig = field(default_factory=StragglerConfig)


class AnomalyDetector:
    def __init__(self, thresholds: Thresholds | None = None):
        self.t = thresholds or Thresholds()
        self.history: dict[tuple[int, str], collections.deque] = {}
        self.slow_steps: dict[int, int] = collections.defaultdict(int)
        # kind -> step of the last alert (any rank); ("straggler", rank) -> step it was reported.
        # The metrics actor puts back a copy when a batch's transaction fails: what it raised is raised again.
        self.last_alert: dict = {}
        self.stragglers = StragglerDetector(self.t.straggler)
        self.scores = self.stragglers.scores  # rank -> (step, straggler score), latest; the actor pops them

    def new_group(self) -> None:
        """A new worker group (a restart): rank speeds are judged afresh; loss history stays."""
        self.stragglers.new_group()
        self.slow_steps.clear()
        for key in [k for k in self.last_alert if isinstance(k, tuple)]:
            del self.last_alert[key]

    def observe(self, rank: int, columns: dict) -> list[Alert]:
        """columns: {key: (steps, values)} from one rank, in step order."""
        alerts: list[Alert] = []
        for key, check in (("train/loss", self._loss), ("train/grad_norm", self._grad),
                           ("train/tokens_per_s", self._throughput), ("ckpt/failed", self._ckpt)):
            if key in columns:
                steps, values = columns[key]
                for s, v in zip(steps, values, strict=True):
                    alert = check(rank, int(s), float(v))
                    if alert and self._fresh(alert):
                        alerts.append(alert)
        if "health/compute_s" in columns:
            self.stragglers.observe(rank, *columns["health/compute_s"])
        alerts += self._straggler_alerts()
        return alerts

    def _fresh(self, alert: Alert) -> bool:
        """One alert per kind per cooldown window, whichever rank saw it first."""
        last = self.last_alert.get(alert.kind)
        if last is not None and abs(alert.step - last) < self.t.cooldown_steps:
            return False
        self.last_alert[alert.kind] = alert.step
        return True

    def _window(self, rank: int, key: str) -> collections.deque:
        return self.history.setdefault((rank, key), collections.deque(maxlen=self.t.window))

    def _loss(self, rank: int, step: int, value: float) -> Alert | None:
        if not math.isfinite(value):
            return Alert("non_finite_loss", "error", step, rank, f"train/loss is {value} at step {step} on rank {rank}")
        hist = self._window(rank, "train/loss")
        alert = None
        if len(hist) >= self.t.min_history:
            med = statistics.median(hist)
            mad = statistics.median(abs(x - med) for x in hist)
            z = (value - med) / (1.4826 * mad + 1e-12 + 1e-3 * abs(med))
            if z > self.t.spike_z:
                alert = Alert("loss_spike", "warning", step, rank,
                              f"train/loss {value:.4g} at step {step} on rank {rank}: recent median {med:.4g}, z={z:.1f}",
                              {"value": value, "median": med, "z": z})
        hist.append(value)
        return alert

    def _grad(self, rank: int, step: int, value: float) -> Alert | None:
        hist = self._window(rank, "train/grad_norm")
        alert = None
        if not math.isfinite(value):
            alert = Alert("grad_norm_explosion", "error", step, rank, f"train/grad_norm is {value} at step {step} on rank {rank}")
        elif len(hist) >= self.t.min_history:
            med = statistics.median(hist)
            if med > 0 and value > self.t.grad_ratio * med:
                alert = Alert("grad_norm_explosion", "warning", step, rank,
                              f"train/grad_norm {value:.4g} at step {step} on rank {rank}: {value / med:.0f}x the recent median {med:.4g}",
                              {"value": value, "median": med})
        if math.isfinite(value):
            hist.append(value)
        return alert

    def _throughput(self, rank: int, step: int, value: float) -> Alert | None:
        hist = self._window(rank, "train/tokens_per_s")
        alert = None
        if len(hist) >= self.t.min_history:
            med = statistics.median(hist)
            if value < self.t.throughput_drop * med:
                self.slow_steps[rank] += 1
                if self.slow_steps[rank] == self.t.throughput_steps:
                    alert = Alert("throughput_drop", "warning", step, rank,
                                  f"tokens/s {value:.4g} on rank {rank} for {self.t.throughput_steps} steps to {step}: "
                                  f"below {self.t.throughput_drop:.0%} of the recent median {med:.4g}",
                                  {"value": value, "median": med})
                return alert  # slow steps do not drag the baseline down
            self.slow_steps[rank] = 0
        hist.append(value)
        return alert

    def _ckpt(self, rank: int, step: int, value: float) -> Alert | None:
        if value > 0:
            return Alert("checkpoint_failed", "error", step, rank, f"checkpoint at step {step} failed on rank {rank}")
        return None

    def _straggler_alerts(self) -> list[Alert]:
        """One alert for the ranks flagged and not yet reported (the slowest named), once per slow spell."""
        flagged = self.stragglers.flagged
        reported = [k for k in self.last_alert if isinstance(k, tuple) and k[0] == "straggler"]
        for key in reported:
            if key[1] not in flagged:  # recovered: a new spell is a new alert
                del self.last_alert[key]
        new = [f for r, f in flagged.items() if ("straggler", r) not in self.last_alert]
        if not new:
            return []
        f = max(new, key=lambda f: f.evidence["slowdown"])
        for other in new:
            self.last_alert[("straggler", other.rank)] = other.step
        also = sorted(o.rank for o in new if o is not f)
        e = f.evidence
        message = (f"rank {f.rank} computes at {f.score:.2f}x the speed of the others "
                   f"({f.rank_compute_s * 1e3:.1f} ms per step against {f.typical_compute_s * 1e3:.1f} ms, "
                   f"{e['evidence_steps']} steps since step {f.onset_step})"
                   + (f"; also slow: rank(s) {', '.join(map(str, also))}" if also else ""))
        return [Alert("straggler", "warning", f.step, f.rank, message,
                      {"score": f.score, "rank_compute_s": f.rank_compute_s, "typical_compute_s": f.typical_compute_s,
                       "onset_step": f.onset_step, "ranks": sorted(o.rank for o in new), **e})]
