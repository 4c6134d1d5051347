"""Reading a rank's process state from /proc (orchestrator/hang/procstate.py), against real
processes this test starts, stops, continues and kills; then the same through a Ray task pinned
to the node, and what the Flight Recorder summary makes of ranks known to be stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from orchestrator.hang import procstate
from orchestrator.hang.followup import known_silent
from orchestrator.hang.rules import flight_recorder_summary


@pytest.fixture
def child():
    """A sleeping Python process of this test's own; killed and reaped at the end whatever happened."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=30)


def state_becomes(pid: int, wanted: set[str], timeout_s: float = 30.0) -> dict:
    """Read until the state is one of `wanted` (a signal takes effect asynchronously), bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = procstate.read(pid)
        if s["state"] in wanted or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


def test_a_real_process_reads_as_sleeping_stopped_continued_zombie_and_gone(child):
    s = state_becomes(child.pid, {"S", "R"})
    assert s["pid"] == child.pid and s["state"] in ("S", "R") and s["at"] > 0
    child.send_signal(signal.SIGSTOP)
    s = state_becomes(child.pid, {"T"})
    assert s["state"] == "T"
    looks = procstate.sample([child.pid], confirm_s=0.3)  # a stopped process is looked at twice
    assert [x["state"] for x in looks] == ["T", "T"] and looks[1]["at"] - looks[0]["at"] >= 0.3
    child.send_signal(signal.SIGCONT)
    assert state_becomes(child.pid, {"S", "R"})["state"] in ("S", "R")
    assert len(procstate.sample([child.pid])) == 1  # a running one once
    child.kill()
    assert state_becomes(child.pid, {"Z"})["state"] == "Z"  # dead, not yet reaped by us
    child.wait(timeout=30)
    assert procstate.read(child.pid)["state"] == procstate.GONE


def test_the_state_follows_the_last_parenthesis_of_the_command_name(tmp_path):
    """/proc/<pid>/stat is "pid (comm) state ...", and comm may hold ") " itself."""
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "stat").write_text("77 (evil) R (name) T 1 77 77 0 -1\n")
    (tmp_path / "77" / "wchan").write_text("do_signal_stop")
    assert procstate.read(77, proc=str(tmp_path)) | {"at": 0} == {"pid": 77, "state": "T", "wchan": "do_signal_stop",
                                                                  "at": 0}


def test_a_thread_stuck_in_the_kernel_is_reported_as_d(tmp_path):
    for tid, state in ((77, "S"), (78, "D")):
        (tmp_path / "77" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "77" / "task" / str(tid) / "stat").write_text(f"{tid} (python) {state} 1\n")
    (tmp_path / "77" / "stat").write_text("77 (python) S 1\n")
    (tmp_path / "77" / "task" / "78" / "wchan").write_text("nv_wait_for_event")
    s = procstate.read(77, proc=str(tmp_path))
    assert (s["state"], s["tid"], s["wchan"]) == ("D", 78, "nv_wait_for_event")


@pytest.mark.ray
def test_the_ray_probe_reads_a_stopped_process_on_its_node(child, ray_address):
    import ray

    node = ray.get_runtime_context().get_node_id()
    probe = procstate.RayProbe(timeout_s=120)
    child.send_signal(signal.SIGSTOP)
    assert state_becomes(child.pid, {"T"})["state"] == "T"
    probe.request(node, {3: child.pid})
    probe.request(node, {3: child.pid})  # one task per node at a time
    assert len(probe.pending) == 1
    got: dict = {}
    deadline = time.monotonic() + 120  # a worker may have to start on a busy machine
    while not got and time.monotonic() < deadline:
        got = probe.answers()
        time.sleep(0.05)
    assert [s["state"] for s in got[3]] == ["T", "T"] and not probe.busy()
    probe.request("f" * 56, {3: child.pid})  # a node Ray does not know: no answer, no error
    deadline = time.monotonic() + 120
    while probe.busy() and time.monotonic() < deadline:
        assert probe.answers() == {}
        time.sleep(0.05)

    # a process of ours already on the node reads too (a rank's or spare's control lane): the first
    # answer wins and its twin is dropped; a reader that fails leaves the task to answer
    reader = ray.remote(num_cpus=0)(Reader).remote()
    ray.get(reader.ping.remote(), timeout=120)
    asked = []

    def read(on, pids):
        asked.append((on, pids))
        return reader.read.remote(pids)

    for fn in (read, lambda on, pids: 1 / 0):
        probe = procstate.RayProbe(timeout_s=120, reader=fn)
        probe.request(node, {3: child.pid})
        assert len(probe.pending) == (2 if fn is read else 1)
        got, deadline = {}, time.monotonic() + 120
        while not got and time.monotonic() < deadline:
            got = probe.answers()
            time.sleep(0.05)
        assert [s["state"] for s in got[3]] == ["T", "T"] and not probe.busy()
    assert asked == [(node, [child.pid])]
    ray.kill(reader)  # a shared cluster: leave no actor behind


class Reader:
    def ping(self) -> bool:
        return True

    def read(self, pids):
        return procstate.sample(pids)


def test_ranks_known_stopped_are_not_waited_for_and_say_why():
    report = {"verdict": "stopped", "culprits": [1],
              "ranks": {0: {"process": {"state": "S"}}, 1: {"process": {"state": "T"}}, 2: {"process": {"state": "gone"}},
                        3: {}}}
    assert known_silent(report) == {1: "stopped (state T)", 2: "gone"}
    fr = flight_recorder_summary({0: None, 3: None}, 4, known=known_silent(report))
    assert fr["silent"] == [1, 2] and fr["culprits"] == [1, 2]
    assert "no dump from rank(s) 1 (stopped (state T))" in fr["summary"] and "rank(s) 2 (gone)" in fr["summary"]
