"""Run-level gauges for Prometheus (an HTTP endpoint of our own registry) and for Ray's metrics
pipeline (`ray.util.metrics`, which the Ray dashboard's Grafana panels read)."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Gauge, start_http_server

RUN_GAUGES = {  # store key -> (metric name, help)
    "train/loss": ("orchestrator_train_loss", "mean training loss over ranks, latest step"),
    "eval/loss": ("orchestrator_eval_loss", "held-out loss, latest eval"),
    "train/tokens_per_s": ("orchestrator_tokens_per_second", "global training throughput"),
    "train/lr": ("orchestrator_learning_rate", "learning rate"),
}
RANK_GAUGES = {
    "train/step_time_s": ("orchestrator_step_time_seconds", "seconds per step, per rank"),
}
GPU_KEY = re.compile(r"^sys/gpu(\d+)/util$")  # per-GPU utilisation, when workers report it


class Exporter:
    """Holds the gauges; `update` is called with the latest values after every batch."""

    def __init__(self, run_id: str, *, host: str | None, port: int | None, ray_metrics: bool = True):
        self.run_id = run_id
        self.registry = CollectorRegistry()
        self.server = None
        self.address = None
        self.step = Gauge("orchestrator_step", "slowest rank's last completed step", ["run"], registry=self.registry)
        self.run_gauges = {k: Gauge(n, h, ["run"], registry=self.registry) for k, (n, h) in RUN_GAUGES.items()}
        self.rank_gauges = {k: Gauge(n, h, ["run", "rank"], registry=self.registry) for k, (n, h) in RANK_GAUGES.items()}
        self.gpu = Gauge("orchestrator_gpu_utilization_percent", "GPU utilisation", ["run", "rank", "gpu"],
                         registry=self.registry)
        if port is not None:
            self.server, _ = start_http_server(port, addr=host or "127.0.0.1", registry=self.registry)
            self.address = f"{host or '127.0.0.1'}:{self.server.server_port}"
        self.ray = _ray_gauges() if ray_metrics else None

    def update(self, step: int, run_values: dict[str, float], rank_values: dict[int, dict[str, float]]) -> None:
        tags = {"run": self.run_id}
        self.step.labels(self.run_id).set(step)
        self._ray_set("orchestrator_step", step, tags)
        for key, value in run_values.items():
            if key in self.run_gauges:
                self.run_gauges[key].labels(self.run_id).set(value)
                self._ray_set(RUN_GAUGES[key][0], value, tags)
        for rank, values in rank_values.items():
            for key, value in values.items():
                if key in self.rank_gauges:
                    self.rank_gauges[key].labels(self.run_id, str(rank)).set(value)
                    self._ray_set(RANK_GAUGES[key][0], value, {**tags, "rank": str(rank)})
                elif m := GPU_KEY.match(key):
                    self.gpu.labels(self.run_id, str(rank), m.group(1)).set(value)

    def _ray_set(self, name: str, value: float, tags: dict[str, str]) -> None:
        if self.ray and name in self.ray:
            self.ray[name].set(value, tags=tags)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def _ray_gauges() -> dict | None:
    """The same figures through Ray's metrics agent; absent outside a Ray worker."""
    try:
        import ray
        from ray.util.metrics import Gauge as RayGauge

        if not ray.is_initialized():
            return None
        out = {"orchestrator_step": RayGauge("orchestrator_step", "slowest rank's step", tag_keys=("run",))}
        for name, help_text in RUN_GAUGES.values():
            out[name] = RayGauge(name, help_text, tag_keys=("run",))
        for name, help_text in RANK_GAUGES.values():
            out[name] = RayGauge(name, help_text, tag_keys=("run", "rank"))
        return out
    except Exception:  # metrics are best effort; training never fails for them
        return None
