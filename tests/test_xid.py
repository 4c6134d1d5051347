"""The NVML Xid listener (orchestrator/hang/xid.py) against a fake NVML module that behaves as
pynvml does (event set, registration per GPU, a wait that times out), and against the real
pynvml on this machine, which has no NVIDIA driver: one line, no thread, no error."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

from orchestrator.hang import xid


class FakeNvml:
    """What the listener calls of pynvml. `events` is what nvmlEventSetWait returns, in order."""

    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_NOT_SUPPORTED = 3
    nvmlEventTypeXidCriticalError = 8
    nvmlEventTypeSingleBitEccError = 1

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self, gpus=2, unsupported=(), init_error=None):
        self.gpus, self.unsupported, self.init_error = gpus, set(unsupported), init_error
        self.events: queue.Queue = queue.Queue()
        self.registered, self.freed, self.shut = [], 0, 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shut += 1

    def nvmlDeviceGetCount(self):
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetIndex(self, handle):
        return handle[1]

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{handle[1]:04d}".encode()

    def nvmlEventSetCreate(self):
        return "the-set"

    def nvmlEventSetFree(self, event_set):
        self.freed += 1

    def nvmlDeviceRegisterEvents(self, handle, types, event_set):
        if handle[1] in self.unsupported:
            raise self.NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        assert types & self.nvmlEventTypeXidCriticalError and event_set == "the-set"
        self.registered.append(handle[1])

    def nvmlEventSetWait(self, event_set, timeout_ms):
        try:
            return self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise self.NVMLError(self.NVML_ERROR_TIMEOUT) from None

    def fire(self, gpu, xid_code, event_type=None):
        self.events.put(SimpleNamespace(device=("handle", gpu), eventType=event_type or self.nvmlEventTypeXidCriticalError,
                                        eventData=xid_code, gpuInstanceId=0, computeInstanceId=0))


def collecting():
    got, seen = [], threading.Event()

    def report(event):
        got.append(event)
        seen.set()

    return got, seen, report


def test_an_xid_becomes_a_gpu_xid_event_naming_the_node_gpu_and_rank():
    nvml = FakeNvml(gpus=2)
    got, seen, report = collecting()
    node = "a1b2c3d4e5f6" + "0" * 44
    listener = xid.XidListener(report, node_id=node, ranks_by_gpu={0: 4, 1: 5}, nvml=nvml, wait_ms=50).start()
    try:
        assert listener.why_not is None and nvml.registered == [0, 1]
        nvml.fire(0, 31, event_type=nvml.nvmlEventTypeSingleBitEccError)  # not an Xid: ignored
        nvml.fire(1, 79)
        assert seen.wait(10), "no event reported"
    finally:
        listener.stop()
    (event,) = got
    assert event["kind"] == "gpu_xid" and event["severity"] == "error" and event["rank"] == 5
    assert event["message"] == "GPU 1 (rank 5) on node a1b2c3d4e5f6 reported Xid 79: GPU has fallen off the bus"
    assert event["data"] == {"xid": 79, "meaning": "GPU has fallen off the bus", "gpu": 1, "gpu_uuid": "GPU-0001",
                             "node": node}
    assert nvml.freed == 1 and nvml.shut == 1 and not listener._thread.is_alive()


def test_an_unknown_xid_and_a_gpu_no_rank_uses_are_still_reported():
    event = xid.to_event(999, gpu=3, uuid=None, node_id=None, rank=None)
    assert event["message"] == "GPU 3 on node ? reported Xid 999: see NVIDIA's Xid catalogue"


def test_gpus_without_event_support_are_skipped_and_none_at_all_means_off():
    nvml = FakeNvml(gpus=3, unsupported={1})
    listener = xid.XidListener(lambda e: None, node_id="n", ranks_by_gpu={}, nvml=nvml, wait_ms=50).start()
    listener.stop()
    assert listener.why_not is None and nvml.registered == [0, 2]
    nvml = FakeNvml(gpus=2, unsupported={0, 1})
    listener = xid.XidListener(lambda e: None, node_id="n", ranks_by_gpu={}, nvml=nvml).start()
    assert listener.why_not == "no GPU here supports NVML Xid events" and listener._thread is None
    assert nvml.freed == 1 and nvml.shut == 1  # what it opened is closed


def test_without_a_driver_it_is_off_in_one_line():
    got, _, report = collecting()
    listener = xid.XidListener(report, node_id="n", ranks_by_gpu={}, nvml=FakeNvml(init_error=9)).start()
    assert listener.why_not == "NVML unavailable (NVMLError: NVML error 9)" and listener._thread is None
    listener.stop()  # harmless
    # the real pynvml: without an NVIDIA driver (this machine), the same with NVML's own words;
    # on a GPU machine it listens to every GPU that supports events
    real = xid.XidListener(report, node_id="n", ranks_by_gpu={}).start()
    try:
        if real.why_not is None:
            assert real.gpus and real._thread.is_alive()
        else:
            assert real.why_not.startswith("NVML unavailable (") and "\n" not in real.why_not
            assert real._thread is None and got == []
    finally:
        real.stop()
