"""Node checks after a stall: NVML parsing through a fake pynvml (and the real one on a GPU host),
host thresholds through faked psutil readings, a real matmul, a real gloo probe, and check_nodes on the session's Ray cluster."""

from __future__ import annotations

import json
import socket
import sys
import time
import types
from types import SimpleNamespace

import psutil
import pynvml as real_nvml
import pytest
import torch

from actors import node_check
from actors.node_check import (
    NodeCheck,
    check_nodes,
    compute_benchmark,
    gpu_problems,
    gpu_report,
    host_problems,
)
from orchestrator.hang.rules import passed_nodes
from tests.conftest import nvml_gpus


def test_gpu_report_says_why_when_there_is_none():
    gpu = gpu_report()
    if nvml_gpus():  # a GPU host: the real report
        assert gpu["available"] is True and len(gpu["gpus"]) == nvml_gpus()
    else:
        assert gpu["available"] is False and gpu["reason"]
        assert "\n" not in gpu["reason"]
        assert gpu_problems(gpu) == []


class NotSupported(Exception):
    pass


class GpuIsLost(Exception):
    pass


def fake_nvml(recovery_action: int | None = None) -> types.ModuleType:
    """GPU 0: 2 uncorrected volatile ECC errors, pages pending retirement, thermal slowdown; power, row
    remapping and (unless given) the recovery action unsupported. GPU 1 has fallen off the bus.
    Constants are the installed pynvml's, so a wrong name in the code fails here too."""
    nv = types.ModuleType("pynvml")
    for name, value in vars(real_nvml).items():
        if name.startswith(("NVML_", "nvmlClocks")) and isinstance(value, int):
            setattr(nv, name, value)
    nv.NVMLError_NotSupported = NotSupported

    def unsupported(*_):
        raise NotSupported("Not Supported")

    def handle(i):
        if i == 1:
            raise GpuIsLost("GPU is lost")
        return "h0"

    def ecc(h, error_type, counter):
        uncorrected = error_type == nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        return 2 if uncorrected and counter == nv.NVML_VOLATILE_ECC else (3 if uncorrected else 0)

    def field_values(h, ids):
        if recovery_action is None:
            raise NotSupported("Not Supported")
        assert ids == [nv.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]
        return [SimpleNamespace(nvmlReturn=0, valueType=nv.NVML_VALUE_TYPE_UNSIGNED_INT,
                                value=SimpleNamespace(uiVal=recovery_action))]

    nv.__dict__.update(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlSystemGetDriverVersion=lambda: "550.54", nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100", nvmlDeviceGetUUID=lambda h: "GPU-0000",
        nvmlDeviceGetTemperature=lambda h, sensor: 84, nvmlDeviceGetPowerUsage=unsupported,
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetClockInfo=lambda h, t: 1200, nvmlDeviceGetMaxClockInfo=lambda h, t: 1980,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=1 << 30, total=80 << 30),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=0, memory=0),
        nvmlDeviceGetTotalEccErrors=ecc,
        nvmlDeviceGetRetiredPages=lambda h, cause: [0x1000] if cause else [],
        nvmlDeviceGetRetiredPagesPendingStatus=lambda h: 1,
        nvmlDeviceGetRemappedRows=unsupported,
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: (nv.nvmlClocksEventReasonGpuIdle
                                                          | nv.nvmlClocksEventReasonHwThermalSlowdown),
        nvmlDeviceGetFieldValues=field_values,
    )
    return nv


def test_nvml_findings_from_a_fake_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    gpu = gpu_report()
    json.dumps(gpu)
    assert gpu["available"] is True and gpu["driver"] == "550.54"
    g0, g1 = gpu["gpus"]
    assert g0["name"] == "NVIDIA H100" and g0["uuid"] == "GPU-0000"
    assert g0["ecc"] == {"volatile_corrected": 0, "volatile_uncorrected": 2,
                         "aggregate_corrected": 0, "aggregate_uncorrected": 3}
    assert g0["retired_pages"] == {"single_bit": 0, "double_bit": 1, "pending": True}
    assert g0["throttle_reasons"] == ["GpuIdle", "HwThermalSlowdown"]
    assert g0["power_w"] is None and g0["power_limit_w"] == 700.0  # one field unsupported, not the report
    assert g0["remapped_rows"] is None and g0["recovery_action"] == "unsupported"
    assert g0["memory_used_mb"] == 1024 and g0["memory_total_mb"] == 80 * 1024
    assert g1 == {"index": 1, "error": "GpuIsLost: GPU is lost"}

    problems = gpu_problems(gpu)
    assert any("GPU 0" in p and "uncorrected ECC" in p and "volatile 2" in p for p in problems)
    assert any("GPU 0" in p and "retired pages pending" in p for p in problems)
    assert any("GPU 0" in p and "HwThermalSlowdown" in p for p in problems)
    assert not any("GpuIdle" in p for p in problems)  # idle clocks are not a problem
    assert any("GPU 1" in p and "lost" in p for p in problems)
    assert len(problems) == 4


def test_recovery_action_decoded_and_flagged(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(real_nvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET))
    gpu = gpu_report()
    assert gpu["gpus"][0]["recovery_action"] == "gpu_reset"
    assert any("recovery action gpu_reset" in p for p in gpu_problems(gpu))

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(real_nvml.NVML_GPU_RECOVERY_ACTION_NONE))
    gpu = gpu_report()
    assert gpu["gpus"][0]["recovery_action"] == "none"
    assert not any("recovery" in p for p in gpu_problems(gpu))


def test_host_thresholds(monkeypatch, tmp_path):
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "not" / "yet"))  # measured on its filesystem
    host = node_check.host_report()
    json.dumps(host)
    assert str(tmp_path / "not" / "yet") in host["disks"] and host["cpu_count"] >= 1

    gib = 1 << 30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=64 * gib, available=gib, percent=98.4))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(percent=75.0))
    monkeypatch.setattr(psutil, "disk_usage", lambda path: SimpleNamespace(percent=99.1, free=2 * gib))
    monkeypatch.setattr(psutil, "cpu_count", lambda: 2)
    monkeypatch.setattr(node_check.os, "getloadavg", lambda: (9.5, 6.0, 3.0))
    problems = host_problems(node_check.host_report())
    assert any("memory nearly exhausted" in p and "1024 MB available" in p for p in problems)
    assert any("swap 75.0% used" in p for p in problems)
    assert sum("99.1% full" in p for p in problems) == 3  # the temp dir, "/" and the tracking store
    assert any("load 9.5 on 2 CPUs" in p for p in problems)


def test_compute_benchmark_on_this_device():
    result = compute_benchmark(0.1)
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result["gflops"] > 0 and result["iters"] >= 1


def test_slow_compute_compared_with_the_healthy_node():
    nodes = {"s" * 56: {"compute": {"gflops": 10.0}, "problems": []},
             "h" * 56: {"compute": {"gflops": 100.0}, "problems": []}}
    node_check._compare_compute(nodes, ["s" * 56], "h" * 56)
    assert nodes["s" * 56]["problems"] == [f"computes at 10% of node {'h' * 12}"]


def test_probe_without_a_peer_fails_with_a_message(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = NodeCheck().probe(rank=0, ip="127.0.0.1", port=port, backend="gloo", device="cpu", nbytes=1024,
                               timeout_s=1)
    assert result["ok"] is False and result["error"]


def test_check_nodes_without_ray_does_not_start_a_cluster(monkeypatch):
    import ray

    def no_init(*a, **kw):
        raise AssertionError("check_nodes must not start a cluster")

    # as in a process that never connected (the session cluster may be up in this one)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_init)
    report = check_nodes(["ab" * 28], [])
    assert report["problems"] == ["node checks need a connected Ray driver"] and report["nodes"] == {}


def _alive(class_name: str) -> list:
    from ray._private import state  # the state API needs the dashboard, which the test cluster has not

    return [a for a in state.actors().values() if a["ActorClassName"] == class_name and a["State"] != "DEAD"]


def _wait_gone(class_name: str, within_s: float = 60.0) -> list:
    deadline = time.monotonic() + within_s
    while _alive(class_name) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(class_name)


@pytest.mark.ray
def test_check_nodes_on_this_node(ray_address):
    import ray

    me = ray.get_runtime_context().get_node_id()
    report = check_nodes([me], [], timeout_s=300, compute_s=0.2, probe_bytes=1 << 20)  # ends when answered
    json.dumps(report)
    node = report["nodes"][me]
    assert node["role"] == "suspect" and node["hostname"] and node["ip"]
    assert node["gpu"]["available"] is bool(nvml_gpus()) and node["compute"]["gflops"] > 0
    assert "memory_total_mb" in node["host"]
    [probe] = report["probes"]
    assert probe["a"] == probe["b"] == me and probe["same_node"] is True and probe["backend"] == "gloo"
    assert probe["ok"] is True, probe["error"]
    assert probe["latency_ms"] > 0 and probe["bandwidth_mb_s"] > 0 and probe["bytes"] == 1 << 20
    assert all(p.startswith(f"node {me[:12]}: ") for p in report["problems"])  # this machine may be busy
    assert passed_nodes(report) == ([] if report["problems"] else [me])
    assert _wait_gone("NodeCheck") == []
    assert check_nodes([], [me]) == {"nodes": {}, "probes": [], "problems": [], "duration_s": 0.0}


@pytest.mark.ray
def test_unknown_node_is_reported_not_raised(ray_address):
    import ray

    me, missing = ray.get_runtime_context().get_node_id(), "ab" * 28
    # timeout_s is generous (the healthy node's checks start actors, slow on a busy machine); an
    # unknown node must fail at once, not wait out the checks' deadline (60% of it)
    report = check_nodes([missing, "not-a-node-id"], [me], timeout_s=300, compute_s=0.1, probe_bytes=1 << 16)
    assert report["duration_s"] < 0.6 * 300
    assert "error" in report["nodes"][missing] and "error" in report["nodes"]["not-a-node-id"]
    assert report["nodes"][me].get("role") == "healthy", report["nodes"][me]
    assert [p["ok"] for p in report["probes"]] == [False, False]
    assert any(p.startswith(f"node {missing[:12]}:") for p in report["problems"])
    assert any(f"between node {missing[:12]} and node {me[:12]}" in p for p in report["problems"])
    assert passed_nodes(report) == []  # the healthy node is no suspect; the others never answered
    assert _wait_gone("NodeCheck") == []


class SlowNodeCheck(NodeCheck):
    def host(self) -> dict:
        time.sleep(600)  # a host check stuck on, say, a hung filesystem
        return {}


@pytest.mark.ray
def test_a_check_that_never_answers_is_bounded(ray_address, monkeypatch):
    import ray

    monkeypatch.setattr(node_check, "NodeCheck", SlowNodeCheck)
    me = ray.get_runtime_context().get_node_id()
    # the check actors must start within 60% of timeout_s (seconds on a quiet machine, 40+ s seen on
    # a very busy one); once up, the stuck check holds the reports for check_s, not to that bound
    report = check_nodes([me], [], timeout_s=100, compute_s=0.1, probe_bytes=1 << 16, check_s=15)
    assert report["duration_s"] < 100 + 30  # bounded by timeout_s, not by the stuck check
    node = report["nodes"][me]
    assert node["host"]["error"].startswith("no answer within")
    assert node["compute"]["gflops"] > 0  # the other checks still answered
    assert report["probes"][0]["ok"] is True  # and the probe ran beside the stuck thread
    assert any("host check failed: no answer" in p for p in report["problems"])
    assert passed_nodes(report) == []
    assert _wait_gone("SlowNodeCheck") == []


def test_only_a_suspect_that_answered_every_check_cleanly_passes():
    def entry(**kw):
        return {"role": "suspect", "host": {}, "gpu": {}, "compute": {"gflops": 1.0}, "problems": [], **kw}

    nodes = {"ok": entry(), "slow": entry(problems=["computes at 30% of node h"]), "gone": {"error": "no actor"},
             "partial": {k: v for k, v in entry().items() if k != "gpu"}, "cut": entry(), "h": entry(role="healthy")}
    probes = [{"a": n, "ok": n != "cut"} for n in ("ok", "slow", "gone", "partial", "cut")]
    report = {"nodes": nodes, "probes": probes, "problems": ["..."]}
    assert passed_nodes(report) == ["ok"]
    assert passed_nodes({"nodes": {"ok": entry()}, "probes": [], "problems": []}) == []  # no probe ran
    assert passed_nodes({"error": "TimeoutError: ..."}) == passed_nodes(None) == []
