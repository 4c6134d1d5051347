"""GPU Xid errors, as the driver reports them to NVML: one listener per node for as long as the
node's ranks run, each critical Xid turned into a `gpu_xid` event naming the node, the GPU and
the rank using it.

An Xid is the NVIDIA driver's record of a GPU fault (48: a double-bit ECC error, 79: the GPU fell
off the bus, 94/95: contained/uncontained ECC errors, ...). The process on that GPU usually dies
with a vague "CUDA error" or an NCCL error somewhere else; the Xid says which GPU and node it was.

NVML's event API (pynvml, from nvidia-ml-py): nvmlEventSetCreate, nvmlDeviceRegisterEvents with
nvmlEventTypeXidCriticalError for each GPU, then nvmlEventSetWait in a thread of its own (it
blocks in C and releases the GIL). Without NVML (no driver, no GPU, no pynvml) the listener says
so in one line and does nothing else; training never depends on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from common.labels import node_label

# the Xids a user is most likely to meet, from NVIDIA's Xid catalogue (the rest are named by number)
MEANING = {
    13: "graphics engine exception (often an out-of-range access in a kernel)",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after an earlier error",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
# What an Xid asks of the run (NVIDIA's catalogue, "Recommended actions"). FATAL: the GPU cannot
# be trusted until it is reset or replaced; the group restarts at once (not after NCCL's timeout,
# minutes later) without that node when the cluster has room. RESTART: the process that met it
# must restart; the GPU keeps working (a contained ECC error). The rest are recorded only: most
# (13, 31, 43) are the application's own faults, or warnings (63, 92).
FATAL = frozenset({48, 64, 74, 79, 95, 119, 120})
RESTART = frozenset({94})
WAIT_MS = 1000  # each nvmlEventSetWait; also how soon stop() is noticed

_listener: XidListener | None = None  # one per worker process (the node's first rank starts it)
_lock = threading.Lock()


def to_event(xid: int, *, gpu: int, uuid: str | None, node_id: str | None, rank: int | None) -> dict:
    """A `gpu_xid` event (what the metrics actor's alert() stores)."""
    meaning = MEANING.get(xid, "see NVIDIA's Xid catalogue")
    used_by = f" (rank {rank})" if rank is not None else ""
    return {"kind": "gpu_xid", "severity": "error",
            "message": f"GPU {gpu}{used_by} on node {node_label(node_id)} reported Xid {xid}: {meaning}",
            "rank": rank, "data": {"xid": xid, "meaning": meaning, "gpu": gpu, "gpu_uuid": uuid, "node": node_id}}


def action(event: dict) -> str | None:
    """"fatal", "restart" or None for a stored or announced `gpu_xid` event (its data)."""
    if event.get("kind") != "gpu_xid":
        return None
    xid = (event.get("data") or {}).get("xid")
    return "fatal" if xid in FATAL else "restart" if xid in RESTART else None


class XidListener:
    """Waits on NVML's event set in a daemon thread; report(event) for each critical Xid."""

    def __init__(self, report: Callable[[dict], None], *, node_id: str | None, ranks_by_gpu: dict[int, int],
                 nvml=None, log: Callable[[str], None] = print, wait_ms: int = WAIT_MS):
        self.report, self.node_id, self.ranks_by_gpu = report, node_id, ranks_by_gpu
        self.nvml, self.log, self.wait_ms = nvml, log, wait_ms
        self.gpus: list[int] = []  # the GPUs registered
        self.reported = 0
        self.why_not: str | None = None  # set when it could not listen
        self._set = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> XidListener:
        """Listen, or set why_not to one line saying why not, for the caller to show (never raises)."""
        try:
            nvml = self.nvml
            if nvml is None:
                import pynvml as nvml  # nvidia-ml-py
                self.nvml = nvml
            nvml.nvmlInit()
        except Exception as e:  # no pynvml, no driver, no GPU: nothing to listen to
            return self._off(f"NVML unavailable ({type(e).__name__}: {e})")
        try:
            self._set = nvml.nvmlEventSetCreate()
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._set)
                except nvml.NVMLError:  # a GPU without event support (some virtualised ones)
                    continue
                self.gpus.append(index)
        except Exception as e:
            self._close_nvml()
            return self._off(f"NVML events unavailable ({type(e).__name__}: {e})")
        if not self.gpus:
            self._close_nvml()
            return self._off("no GPU here supports NVML Xid events")
        self._thread = threading.Thread(target=self._run, name="xid-listener", daemon=True)
        self._thread.start()
        return self

    def _off(self, why: str) -> XidListener:
        self.why_not = why
        return self

    def _run(self) -> None:
        nvml = self.nvml
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(self._set, self.wait_ms)
            except nvml.NVMLError as e:
                if getattr(e, "value", None) == nvml.NVML_ERROR_TIMEOUT:
                    continue
                self.log(f"Xid listener on node {node_label(self.node_id)} stopped: {e}")
                return
            try:
                self._report(data)
            except Exception as e:  # a report that cannot be sent must not end the listening
                self.log(f"Xid listener on node {node_label(self.node_id)}: could not report an Xid: {e}")

    def _report(self, data) -> None:
        nvml = self.nvml
        if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
            return
        gpu = nvml.nvmlDeviceGetIndex(data.device)
        try:
            uuid = nvml.nvmlDeviceGetUUID(data.device)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        except nvml.NVMLError:
            uuid = None
        self.reported += 1
        self.report(to_event(int(data.eventData), gpu=gpu, uuid=uuid, node_id=self.node_id,
                             rank=self.ranks_by_gpu.get(gpu)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.wait_ms / 1000 + 5)
        self._close_nvml()

    def _close_nvml(self) -> None:
        try:
            if self._set is not None:
                self.nvml.nvmlEventSetFree(self._set)
            self._set = None
            self.nvml.nvmlShutdown()
        except Exception:  # already gone
            pass


def listen(metrics, node_id: str, ranks_by_gpu: dict[int, int]) -> str | None:
    """In a worker process (the node's first rank; worker_group.py sends it): start this node's
    listener for the life of the process, reporting through the run's metrics actor. Returns None
    when it listens, else the one line why it does not."""
    global _listener

    def report(event: dict) -> None:
        metrics.alert.remote(event["kind"], event["severity"], event["message"], rank=event["rank"],
                             data=event["data"])

    with _lock:
        if _listener is None:
            _listener = XidListener(report, node_id=node_id, ranks_by_gpu=ranks_by_gpu).start()
        return _listener.why_not
