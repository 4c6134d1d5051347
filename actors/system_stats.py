"""Per-rank system telemetry: host and process figures from psutil, per-GPU figures from NVML.

A machine without GPUs (or without the NVML library) simply reports no `sys/gpu*` keys.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import psutil

GPU_FIELDS = (  # (key suffix, reading); each guarded: not every GPU or driver has every field
    ("util", lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
    ("mem_used_bytes", lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).used),
    ("mem_total_bytes", lambda nv, h: nv.nvmlDeviceGetMemoryInfo(h).total),
    ("temp_c", lambda nv, h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
    ("power_w", lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
    ("energy_j", lambda nv, h: nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0),
    ("sm_clock_mhz", lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
    ("ecc_uncorrected", lambda nv, h: nv.nvmlDeviceGetTotalEccErrors(
        h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)),
)


class GpuStats:
    """NVML readings for the GPUs this process can see (CUDA_VISIBLE_DEVICES, as Ray sets it)."""

    def __init__(self, nvml=None):
        """`nvml` is the pynvml module (injectable for tests); imported here when not given."""
        self.nvml, self.handles = None, []
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            self.handles = self._visible_handles(nvml)
            self.nvml = nvml
        except Exception:  # no driver, no library, no GPU: not an error
            self.handles = []

    @staticmethod
    def _visible_handles(nv) -> list:
        count = nv.nvmlDeviceGetCount()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        handles = []
        for entry in (x.strip() for x in visible.split(",")):
            if entry.isdigit() and int(entry) < count:
                handles.append(nv.nvmlDeviceGetHandleByIndex(int(entry)))
            elif entry.startswith(("GPU-", "MIG-")):
                handles.append(nv.nvmlDeviceGetHandleByUUID(entry))
        return handles

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        nv = self.nvml
        for i, h in enumerate(self.handles):
            p = f"sys/gpu{i}/"
            for key, fn in GPU_FIELDS:
                try:
                    out[p + key] = float(fn(nv, h))
                except Exception:  # a field this GPU or driver does not support
                    pass
        return out


class SystemStats:
    def __init__(self):
        self.proc = psutil.Process()
        self.proc.cpu_percent()  # the first call only starts the measurement window
        psutil.cpu_percent()
        self.gpus = GpuStats()

    def read(self) -> dict[str, float]:
        mem = psutil.virtual_memory()
        cpu = self.proc.cpu_times()
        out = {
            "sys/cpu_percent": psutil.cpu_percent(),
            "sys/process_cpu_percent": self.proc.cpu_percent(),
            # cumulative, so CPU seconds per step = its slope against the step (moves little with
            # the machine's load, unlike step times on a shared host)
            "sys/process_cpu_s": cpu.user + cpu.system,
            "sys/process_rss_bytes": float(self.proc.memory_info().rss),
            "sys/host_mem_used_percent": mem.percent,
            "sys/host_mem_available_bytes": float(mem.available),
        }
        disk = psutil.disk_io_counters()
        if disk is not None:
            out["sys/disk_read_bytes"] = float(disk.read_bytes)
            out["sys/disk_write_bytes"] = float(disk.write_bytes)
        net = psutil.net_io_counters()
        if net is not None:
            out["sys/net_sent_bytes"] = float(net.bytes_sent)
            out["sys/net_recv_bytes"] = float(net.bytes_recv)
        out.update(self.gpus.read())
        return out


class SystemSampler:
    """Logs `SystemStats` every `every_s` seconds from a daemon thread until stopped."""

    def __init__(self, log: Callable[[dict[str, float]], None], every_s: float):
        self.log = log
        self.every_s = every_s
        self.stats = SystemStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-stats", daemon=True)

    def start(self) -> SystemSampler:
        if self.every_s > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.log(self.stats.read())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.every_s + 5)
