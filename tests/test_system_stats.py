"""System telemetry: real psutil figures; GPU figures through a fake NVML (and the real one where a GPU is)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from actors.system_stats import GpuStats, SystemSampler, SystemStats
from tests.conftest import nvml_gpus


def test_host_and_process_figures_with_or_without_gpu():
    stats = SystemStats().read()
    assert stats["sys/process_rss_bytes"] > 10e6
    assert 0 <= stats["sys/host_mem_used_percent"] <= 100
    assert "sys/cpu_percent" in stats and "sys/net_sent_bytes" in stats
    burn = time.process_time() + 0.2
    while time.process_time() < burn:  # some CPU between two readings
        pass
    # cumulative seconds; /proc counts in 10 ms ticks, so allow a tick at each end
    assert SystemStats().read()["sys/process_cpu_s"] >= stats["sys/process_cpu_s"] + 0.17
    gpu_keys = [k for k in stats if k.startswith("sys/gpu")]
    if nvml_gpus():
        assert "sys/gpu0/util" in gpu_keys
    else:
        assert gpu_keys == []  # no driver: no keys, and no error


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0

    def __init__(self, count=4):
        self.count = count

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return int(uuid.rsplit("-", 1)[1])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=10 * h)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=1 << 30, total=16 << 30)

    def nvmlDeviceGetTemperature(self, h, kind):
        return 60 + h

    def nvmlDeviceGetPowerUsage(self, h):
        return 250_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")  # older GPUs: the field is skipped

    def nvmlDeviceGetClockInfo(self, h, kind):
        return 1410

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        return 2


def test_gpu_fields_for_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # as Ray sets it for a worker with 2 GPUs
    out = GpuStats(nvml=FakeNvml()).read()
    assert out["sys/gpu0/util"] == 20 and out["sys/gpu1/util"] == 30  # local index -> physical GPU 2, 3
    assert out["sys/gpu0/power_w"] == 250.0 and out["sys/gpu0/temp_c"] == 62
    assert out["sys/gpu1/ecc_uncorrected"] == 2 and out["sys/gpu0/mem_total_bytes"] == 16 << 30
    assert "sys/gpu0/energy_j" not in out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa-1")
    assert GpuStats(nvml=FakeNvml()).read()["sys/gpu0/util"] == 10


def test_nvml_missing_is_not_an_error():
    class Broken:
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    assert GpuStats(nvml=Broken()).read() == {}


def test_sampler_logs_periodically_and_stops():
    seen = []
    sampler = SystemSampler(seen.append, every_s=0.05).start()
    deadline = time.monotonic() + 60  # returns after two samples; generous for a busy machine
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    sampler.stop()
    assert len(seen) >= 2 and "sys/process_rss_bytes" in seen[0]
    n = len(seen)
    time.sleep(0.2)
    assert len(seen) == n  # stopped
