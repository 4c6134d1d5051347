"""A real Prometheus server (Debian's package) on loopback scrapes the metrics actor's endpoint
and returns our series by query."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from actors.metrics_actor import MetricsActor
from orchestrator.anomaly import AnomalyDetector
from orchestrator.series import columns
from orchestrator.store import Store
from tests.conftest import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=60) as r:  # a busy machine slows Prometheus too
        return json.load(r)["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus scraping whatever targets the test writes into targets.json."""
    assert os.path.exists(PROMETHEUS), (
        "Debian's prometheus package is required (the Makefile's sysdeps target installs it)"
    )
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: orchestrator\n"
        f"    file_sd_configs: [{{files: ['{targets}'], refresh_interval: 1s}}]\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("prometheus did not become ready within 60 s")
        yield port, targets
    finally:
        proc.terminate()  # only the process we started, by pid
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_prometheus_scrapes_run_gauges(tmp_path, prometheus):
    prom_port, targets = prometheus
    actor = MetricsActor("run-abc", str(tmp_path / "home"), open_store=Store, detector=AnomalyDetector(), prometheus_host="127.0.0.1", prometheus_port=0)
    try:
        host, port = actor.prometheus_address().split(":")
        assert host == "127.0.0.1" and int(port) > 0
        for step in range(5):
            for rank in (0, 1):
                actor.log_columns(rank, None, columns([("train/loss", step, 4.0 - step * 0.5 + rank),
                                                       ("train/step_time_s", step, 0.1 * (rank + 1)),
                                                       ("train/tokens_per_s", step, 1000.0),
                                                       ("sys/gpu0/util", step, 50.0 + rank)]))
        targets.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"]}]))
        results = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(results) < 4:  # bounded wait for a scrape
            for name in ("orchestrator_train_loss", "orchestrator_step", "orchestrator_step_time_seconds",
                         "orchestrator_gpu_utilization_percent"):
                found = query(prom_port, f'{name}{{run="run-abc"}}')
                if found:
                    results[name] = found
            time.sleep(0.5)
        assert set(results) == {"orchestrator_train_loss", "orchestrator_step", "orchestrator_step_time_seconds",
                                "orchestrator_gpu_utilization_percent"}, results
        assert float(results["orchestrator_train_loss"][0]["value"][1]) == pytest.approx(2.5)  # mean of 2.0, 3.0
        assert float(results["orchestrator_step"][0]["value"][1]) == 4
        by_rank = {r["metric"]["rank"]: float(r["value"][1]) for r in results["orchestrator_step_time_seconds"]}
        assert by_rank == pytest.approx({"0": 0.1, "1": 0.2})
    finally:
        actor.close()


def test_no_endpoint_by_default(tmp_path):
    actor = MetricsActor("r", str(tmp_path), open_store=Store, detector=AnomalyDetector())
    assert actor.prometheus_address() is None
    actor.close()


def test_grafana_dashboard_queries_only_metrics_we_export():
    import re
    from pathlib import Path

    from actors.prometheus_export import RANK_GAUGES, RUN_GAUGES

    exported = {"orchestrator_step", "orchestrator_gpu_utilization_percent"}
    exported |= {name for name, _ in RUN_GAUGES.values()} | {name for name, _ in RANK_GAUGES.values()}
    dash = json.loads((Path(__file__).resolve().parent.parent / "docs/grafana/orchestrator-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"orchestrator_[a-z_]+", e)}
    assert used == exported  # every panel has data, every gauge has a panel
