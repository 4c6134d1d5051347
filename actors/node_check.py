"""Node diagnostics after a stall: is the suspect node itself unwell?

A hung collective names a rank and its node, but not why. One short-lived `NodeCheck` actor per
node (0 CPUs, pinned to the node) reads what usually explains it:

- GPU health from NVML: uncorrected ECC errors, pending page retirement / row remapping, a
  recovery action the driver asks for, hardware or thermal clock slowdowns, heat;
- host pressure from psutil: memory, swap, disk of the temp dir and of the tracking store, load;
- compute speed: a fixed matmul, compared with a healthy node's;
- the network and collective library: a two-rank all-reduce between the suspect and a healthy
  node (gloo on CPU, NCCL when both have GPUs), with latency and bandwidth.

Everything is bounded by the caller's timeout and nothing raises: a failed check becomes an error
string, a machine without GPUs reports "not available" with the reason.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psutil

from common.labels import node_label

MIB = 1 << 20
# Idle, clock settings, sync boost and the software power cap are normal; these slow a GPU down.
SLOWDOWNS = ("HwSlowdown", "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown")
VALUE_FIELDS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")  # by NVML_VALUE_TYPE_*


def _one_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300].rstrip(": ")


def _get(read):
    """One reading; None where the GPU or driver does not support it (NVMLError_NotSupported) or fails."""
    try:
        return read()
    except Exception:
        return None


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def _constants(nv, prefix: str) -> dict[int, str]:
    return {getattr(nv, k): k[len(prefix):] for k in dir(nv) if k.startswith(prefix)}


def _recovery_action(nv, h) -> str:
    fid = getattr(nv, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
    v = None if fid is None else _get(lambda: nv.nvmlDeviceGetFieldValues(h, [fid])[0])
    if v is None or v.nvmlReturn != 0:  # 0 is NVML_SUCCESS
        return "unsupported"
    code = getattr(v.value, VALUE_FIELDS[v.valueType])
    return _constants(nv, "NVML_GPU_RECOVERY_ACTION_").get(code, f"unknown {code}").lower()


def _throttle_reasons(nv, h) -> list[str] | None:
    prefix, mask = "nvmlClocksEventReason", _get(lambda: nv.nvmlDeviceGetCurrentClocksEventReasons(h))
    if mask is None:  # drivers before 535 have only the older name
        prefix = "nvmlClocksThrottleReason"
        mask = _get(lambda: nv.nvmlDeviceGetCurrentClocksThrottleReasons(h))
    if mask is None:
        return None
    bits = {k[len(prefix):]: v for k, v in vars(nv).items()  # without the aliases and the masks
            if k.startswith(prefix) and k[len(prefix):] not in ("None", "All", "UserDefinedClocks")}
    return [name for name, bit in bits.items() if mask & bit]


def _gpu(nv, i: int) -> dict:
    h = nv.nvmlDeviceGetHandleByIndex(i)
    mem = _get(lambda: nv.nvmlDeviceGetMemoryInfo(h))
    power = _get(lambda: nv.nvmlDeviceGetPowerUsage(h))
    limit = _get(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    ecc = {f"{counter}_{kind}": _get(lambda c=c, t=t: nv.nvmlDeviceGetTotalEccErrors(h, t, c))
           for counter, c in (("volatile", nv.NVML_VOLATILE_ECC), ("aggregate", nv.NVML_AGGREGATE_ECC))
           for kind, t in (("corrected", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                           ("uncorrected", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED))}
    pages = {kind: _get(lambda c=c: len(nv.nvmlDeviceGetRetiredPages(h, c)))
             for kind, c in (("single_bit", nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
                             ("double_bit", nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))}
    pages["pending"] = _get(lambda: bool(nv.nvmlDeviceGetRetiredPagesPendingStatus(h)))
    rows = _get(lambda: nv.nvmlDeviceGetRemappedRows(h))  # (correctable, uncorrectable, pending, failed)
    return {
        "index": i,
        "name": _text(_get(lambda: nv.nvmlDeviceGetName(h))),
        "uuid": _text(_get(lambda: nv.nvmlDeviceGetUUID(h))),
        "temperature_c": _get(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        "power_w": None if power is None else power / 1000,  # NVML reports milliwatts
        "power_limit_w": None if limit is None else limit / 1000,
        "sm_clock_mhz": _get(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
        "max_sm_clock_mhz": _get(lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
        "memory_used_mb": None if mem is None else mem.used // MIB,
        "memory_total_mb": None if mem is None else mem.total // MIB,
        "utilization_pct": _get(lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
        "ecc": ecc if any(v is not None for v in ecc.values()) else None,
        "retired_pages": pages if any(v is not None for v in pages.values()) else None,
        "remapped_rows": None if rows is None else {"correctable": rows[0], "uncorrectable": rows[1],
                                                    "pending": bool(rows[2]), "failed": bool(rows[3])},
        "throttle_reasons": _throttle_reasons(nv, h),
        "recovery_action": _recovery_action(nv, h),
    }


def gpu_report(nvml=None) -> dict:
    """Every GPU on this node as NVML sees it (all of them: NVML ignores CUDA_VISIBLE_DEVICES).
    `nvml` is the pynvml module, injectable for tests."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as e:  # no library, no driver
        return {"available": False, "reason": _one_line(e)}
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            try:
                gpus.append(_gpu(nvml, i))
            except Exception as e:  # e.g. NVMLError_GpuIsLost: a finding, not a failure of the check
                gpus.append({"index": i, "error": _one_line(e)})
        return {"available": True, "driver": _text(_get(nvml.nvmlSystemGetDriverVersion)), "gpus": gpus}
    except Exception as e:
        return {"available": False, "reason": _one_line(e)}
    finally:
        _get(nvml.nvmlShutdown)


def gpu_problems(gpu: dict) -> list[str]:
    out = []
    for g in gpu.get("gpus") or []:
        p = f"GPU {g['index']}"
        if g.get("error"):
            out.append(f"{p}: {g['error']}")
        ecc, retired, rows = g.get("ecc") or {}, g.get("retired_pages") or {}, g.get("remapped_rows") or {}
        if ecc.get("volatile_uncorrected") or ecc.get("aggregate_uncorrected"):
            out.append(f"{p}: uncorrected ECC errors (volatile {ecc.get('volatile_uncorrected')}, "
                       f"aggregate {ecc.get('aggregate_uncorrected')})")
        if retired.get("pending"):
            out.append(f"{p}: retired pages pending (a GPU reset retires them)")
        if rows.get("pending"):
            out.append(f"{p}: row remapping pending (a GPU reset applies it)")
        if rows.get("failed"):
            out.append(f"{p}: row remapping failed")
        if g.get("recovery_action") not in ("none", "unsupported", None):
            out.append(f"{p}: driver asks for recovery action {g['recovery_action']}")
        slow = [r for r in g.get("throttle_reasons") or [] if r in SLOWDOWNS]
        if slow:
            out.append(f"{p}: clocks slowed down ({', '.join(slow)})")
        if (g.get("temperature_c") or 0) >= 90:
            out.append(f"{p}: temperature {g['temperature_c']} C")
    return out


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def host_report() -> dict:
    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    # the temp dir holds the shard cache and spilled objects; "/" the rest; the store only if set here
    paths = dict.fromkeys([tempfile.gettempdir(), "/", os.environ.get("ORCHESTRATOR_HOME")])
    disks = {}
    for path in filter(None, paths):
        d = psutil.disk_usage(str(_existing(Path(path).expanduser())))  # may not exist yet: its filesystem does
        disks[path] = {"percent": d.percent, "free_gb": round(d.free / 1e9, 2)}
    return {"memory_total_mb": vm.total // MIB, "memory_available_mb": vm.available // MIB,
            "memory_percent": vm.percent, "swap_percent": swap.percent, "disks": disks,
            "load": [round(x, 2) for x in os.getloadavg()], "cpu_count": psutil.cpu_count() or 1}


def host_problems(host: dict) -> list[str]:
    out = []
    if host["memory_available_mb"] < 0.05 * host["memory_total_mb"]:
        out.append(f"memory nearly exhausted: {host['memory_available_mb']} MB available "
                   f"of {host['memory_total_mb']} MB")
    if host["swap_percent"] > 50:
        out.append(f"swap {host['swap_percent']}% used")
    for path, d in host["disks"].items():
        if d["percent"] > 95:
            out.append(f"disk of {path} {d['percent']}% full ({d['free_gb']} GB free)")
    if host["load"][0] > 4 * host["cpu_count"]:
        out.append(f"load {host['load'][0]:.1f} on {host['cpu_count']} CPUs")
    return out


def compute_benchmark(seconds: float = 0.5) -> dict:
    """Matmul GFLOP/s on this node's device (GPU 0 when there is one), for about `seconds`."""
    import torch

    cuda = torch.cuda.is_available()
    n, device = (4096, "cuda") if cuda else (512, "cpu")
    if not cuda:
        torch.set_num_threads(1)  # comparable across nodes, and the check stays light
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    c = a @ b  # warm-up: lazy init and kernel choice
    sync()
    iters, start = 0, time.perf_counter()
    while iters == 0 or time.perf_counter() - start < seconds:
        torch.matmul(a, b, out=c)
        sync()
        iters += 1
    elapsed = time.perf_counter() - start
    return {"device": device, "gflops": round(2 * n**3 * iters / elapsed / 1e9, 2), "iters": iters,
            "seconds": round(elapsed, 3)}


class NodeCheck:
    """Runs the checks on its node. A fresh process used once, so the default process group is ours."""

    def info(self) -> dict:
        import ray
        import torch

        return {"hostname": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                "cuda_devices": torch.cuda.device_count()}

    def host(self) -> dict:
        return host_report()

    def gpu(self) -> dict:
        return gpu_report()

    def compute(self, seconds: float) -> dict:
        return compute_benchmark(seconds)

    def probe_address(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def probe(self, *, rank: int, ip: str, port: int, backend: str, device: str, nbytes: int,
              timeout_s: float) -> dict:
        """Two-rank all-reduce: median latency of a 4-byte tensor, algorithm bandwidth of `nbytes`."""
        import torch
        import torch.distributed as dist

        if ip.startswith("127.") and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # a loopback cluster: keep gloo off other interfaces
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def seconds_per_op(t, reps: int) -> float:
            start = time.perf_counter()
            for _ in range(reps):
                dist.all_reduce(t)
            sync()
            return (time.perf_counter() - start) / reps

        try:
            dist.init_process_group(backend, init_method=f"tcp://{ip}:{port}", rank=rank, world_size=2,
                                    timeout=timedelta(seconds=timeout_s))
            small, big = torch.ones(1, device=device), torch.ones(max(nbytes // 4, 1), device=device)
            seconds_per_op(small, 2), seconds_per_op(big, 1)  # warm-up: connections, communicator, buffers
            latency = statistics.median(seconds_per_op(small, 1) for _ in range(20))
            nbytes = big.numel() * 4
            bandwidth = nbytes / seconds_per_op(big, 3) / 1e6  # algorithm bandwidth; MB = 1e6, as nccl-tests
            return {"ok": True, "latency_ms": round(latency * 1e3, 3), "bandwidth_mb_s": round(bandwidth, 1),
                    "bytes": nbytes, "error": None}
        except Exception as e:
            return {"ok": False, "error": _one_line(e)}
        finally:
            if dist.is_initialized():
                _get(dist.destroy_process_group)


def _collect(refs: dict, deadline: float) -> dict:
    """Each ref's value if it answers before `deadline`; an error or silence becomes {"error": ...}."""
    import ray

    if not refs:
        return {}
    budget = max(deadline - time.monotonic(), 0.0)
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=budget)
    out = {}
    for key, ref in refs.items():
        try:
            out[key] = ray.get(ref) if ref in ready else {"error": f"no answer within {budget:.0f}s"}
        except Exception as e:  # the actor died or could not be placed
            out[key] = {"error": _one_line(e)}
    return out


def _failed(value) -> str | None:
    return value.get("error") if isinstance(value, dict) else None


def check_nodes(suspects: list[str], healthy: list[str], *, timeout_s: float = 60.0,
                compute_s: float = 0.5, probe_bytes: int = 8 << 20, check_s: float | None = None) -> dict:
    """Check each suspect node and the first healthy one, and probe an all-reduce between each suspect
    and that healthy node (or, with none, between two processes on the suspect). Needs a connected
    Ray driver; returns {"nodes", "probes", "problems", "duration_s"}, JSON-serialisable.

    The reports get 60% of timeout_s, actor starts included; check_s, when given, also bounds them
    from the moment every check actor is up (a stuck check is given up on sooner when actors
    start fast)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    t0 = time.monotonic()
    suspects = list(dict.fromkeys(suspects))
    if not suspects or not ray.is_initialized():  # never start a cluster of our own by accident
        problems = [] if not suspects else ["node checks need a connected Ray driver"]
        return {"nodes": {}, "probes": [], "problems": problems, "duration_s": 0.0}
    others = [h for h in healthy if h not in suspects][:1]
    roles = {**{s: "suspect" for s in suspects}, **{h: "healthy" for h in others}}
    remote_cls, started, got = ray.remote(NodeCheck), [], {}

    def start(key, node_id: str):
        try:  # threads: a check stuck on a hung GPU or filesystem leaves the others free to answer
            where = NodeAffinitySchedulingStrategy(node_id, soft=False)
            actor = remote_cls.options(num_cpus=0, max_concurrency=6, name=None, scheduling_strategy=where)
            actor = actor.remote()
        except Exception as e:  # e.g. not a node id at all
            got[key] = {"error": _one_line(e)}
            return None
        started.append(actor)
        return actor

    try:
        actors = {n: start((n, "info"), n) for n in roles}
        partners = {s: start((s, "partner"), (others or [s])[0]) for s in suspects}  # probe rank 1
        refs = {}
        for n, a in actors.items():
            if a:
                refs.update({(n, "info"): a.info.remote(), (n, "host"): a.host.remote(),
                             (n, "gpu"): a.gpu.remote(), (n, "compute"): a.compute.remote(compute_s)})
        refs.update({(s, "partner"): a.info.remote() for s, a in partners.items() if a})
        # Reports first and probes after, so the matmul does not disturb the probe; probes keep 40%.
        reports_end = t0 + 0.6 * timeout_s
        if check_s is not None:  # the actors answer info once up; each check then has check_s
            got.update(_collect({k: r for k, r in refs.items() if k[1] in ("info", "partner")}, reports_end))
            reports_end = min(reports_end, time.monotonic() + check_s)
        got.update(_collect({k: r for k, r in refs.items() if k not in got}, reports_end))
        nodes = {n: _node_entry(roles[n], n, got) for n in roles}
        if others:
            _compare_compute(nodes, suspects, others[0])
        probes = _probes(suspects, others, actors, partners, got, t0 + timeout_s, probe_bytes)
    finally:
        for actor in started:
            _get(lambda actor=actor: ray.kill(actor, no_restart=True))
    problems = [f"node {node_label(n)}: {p}" for n, e in nodes.items()
                for p in e.get("problems", [e.get("error")])]
    for p in probes:
        if not p["ok"]:
            where = (f"on node {node_label(p['a'])} (two processes)" if p["same_node"]
                     else f"between node {node_label(p['a'])} and node {node_label(p['b'])}")
            problems.append(f"all-reduce probe {where} failed: {p['error']}")
    return {"nodes": nodes, "probes": probes, "problems": problems,
            "duration_s": round(time.monotonic() - t0, 3)}


def _compare_compute(nodes: dict, suspects: list[str], healthy: str) -> None:
    base = nodes[healthy].get("compute", {}).get("gflops")
    for s in suspects:
        mine = nodes[s].get("compute", {}).get("gflops")
        if base and mine is not None and mine < 0.5 * base:
            nodes[s]["problems"].append(f"computes at {100 * mine / base:.0f}% of node {node_label(healthy)}")


def _node_entry(role: str, node_id: str, got: dict) -> dict:
    info = got[(node_id, "info")]
    if _failed(info):
        return {"error": _failed(info)}
    entry = {"role": role, **info, "problems": []}
    for section, judge in (("host", host_problems), ("gpu", gpu_problems), ("compute", lambda _: [])):
        entry[section] = got[(node_id, section)]
        error = _failed(entry[section])
        entry["problems"] += [f"{section} check failed: {error}"] if error else judge(entry[section])
    return entry


def _probes(suspects, others, actors, partners, got, deadline, nbytes) -> list[dict]:
    probes, addresses = {}, {}
    for s in suspects:
        b = others[0] if others else s
        probes[s] = {"a": s, "b": b, "same_node": b == s, "ok": False, "backend": "gloo", "latency_ms": None,
                     "bandwidth_mb_s": None, "bytes": nbytes, "error": None}
        a_info, b_info = got[(s, "info")], got[(s, "partner")]
        if _failed(a_info) or _failed(b_info):
            probes[s]["error"] = f"not run: no check actor on node {node_label(b if _failed(b_info) else s)}"
            continue
        # NCCL needs a GPU per rank: two ranks on one node need two GPUs.
        if a_info["cuda_devices"] and b_info["cuda_devices"] and (b != s or a_info["cuda_devices"] >= 2):
            probes[s]["backend"] = "nccl"
        addresses[s] = actors[s].probe_address.remote()
    refs = {}
    for s, addr in _collect(addresses, deadline).items():
        if _failed(addr):
            probes[s]["error"] = _failed(addr)
            continue
        timeout = max(1.0, 0.8 * (deadline - time.monotonic()))  # torch gives up first, with its own message
        backend = probes[s]["backend"]
        for rank, actor in enumerate((actors[s], partners[s])):
            device = f"cuda:{rank if probes[s]['same_node'] else 0}" if backend == "nccl" else "cpu"
            refs[(s, rank)] = actor.probe.remote(rank=rank, ip=addr[0], port=addr[1], backend=backend,
                                                 device=device, nbytes=nbytes, timeout_s=timeout)
    results = _collect(refs, deadline)
    for (s, rank), r in sorted(results.items(), reverse=True):  # rank 0's figures (and error) win
        if r.get("ok"):
            probes[s].update({k: r[k] for k in ("latency_ms", "bandwidth_mb_s", "bytes")})
        else:
            probes[s]["error"] = f"rank {rank}: {r.get('error')}"
    for s in {s for s, _ in results}:
        probes[s]["ok"] = probes[s]["error"] is None
    return [probes[s] for s in suspects]
