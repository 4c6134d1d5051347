"""Script mode's restarts in place and warm script processes (orchestrator/zygote.py): a script
killed from outside comes back as a new process in the same worker, and a script forked from
the warm process sees what `python script.py` would have shown it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.controller import RunFailed
from orchestrator.policy import Failure, FailureKind
from tests.conftest import REPO, cli_json, launch_in_background, run_cli, tiny_config

SCRIPT = str(REPO / "examples" / "torchrun_ddp.py")
PROBE = str(REPO / "tests" / "script_probe.py")


def lines_of(home, run_id, **filters) -> list[dict]:
    return cli_json("logs", run_id, *[f"--{k}={v}" for k, v in filters.items()], home=home)["lines"]


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def script_pid(worker_pid: int) -> int | None:
    """The rank's script: the worker's descendant with no children of its own (under a warm start
    the worker's child is the warm process and the script its child; under exec, the child)."""
    todo, leaves = children(worker_pid), []
    while todo:
        pid = todo.pop()
        kids = children(pid)
        todo += kids
        if not kids:
            leaves.append(pid)
    return leaves[0] if len(leaves) == 1 else None


# --- the restart decision (the controller with tests/test_controller.py's fake group) ---------


def script_exit(rank=1):
    return Failure(FailureKind.EXCEPTION, f"rank {rank} failed during training: UserCodeError: train.py killed by "
                   "signal 9", rank=rank, node_id=f"node-{rank}", data={"script_exit": True})


def controller(tmp_path, scripts, *, keeps=True, **cfg):
    from tests.test_controller import setup

    c, group, store, lines = setup(tmp_path, scripts, cfg={"entrypoint": {"script": PROBE}, **cfg})
    group.in_place_calls = []

    def stop(*, in_place=False, keep_placement=False):  # the real group keeps its workers only if they all answer
        group.stops += 1
        group.in_place_calls.append(in_place)
        group.kept_placement.append(keep_placement)
        return in_place and keeps

    group.stop = stop
    return c, group, store, lines


def test_a_script_exit_restarts_in_place_counted_and_recorded_like_any_restart(tmp_path):
    c, group, store, lines = controller(tmp_path, [["ckpt", script_exit()], [script_exit(0)], ["step", "done"]])
    summary = c.run()
    assert summary["restarts"] == 2 and group.started == [0, 1, 2]
    assert group.in_place_calls == [True, True]
    assert sum(line == "restarting in place: the ranks' workers stay, their scripts start anew" for line in lines) == 2
    assert [a["status"] for a in store.attempts("r1")] == ["failed", "failed", "completed"]
    assert [e["kind"] for e in store.events("r1")] == ["failure_exception", "failure_exception"]
    assert store.events("r1")[0]["data"]["script_exit"] is True


def test_dead_workers_hangs_and_giving_up_replace_the_group(tmp_path):
    died = Failure(FailureKind.DIED, "rank 1 died", rank=1, node_id="node-1")
    gpu = Failure(FailureKind.GPU, "rank 0: CUDA error", rank=0, node_id="node-0", data={"script_exit": True})
    c, group, store, lines = controller(tmp_path, [[died], [gpu], [script_exit()]],
                                        fault_tolerance={"max_restarts": 2})
    with pytest.raises(RunFailed, match="after 2 restarts"):
        c.run()
    assert group.in_place_calls == [False, False, False]  # the last: no restart follows
    assert group.kept_placement == [True, False, False]  # a GPU fault's node is not trusted; no restart, none kept
    assert not any("in place" in line for line in lines)


def test_workers_that_do_not_answer_mean_a_full_restart(tmp_path):
    c, group, _, lines = controller(tmp_path, [[script_exit()], ["step", "done"]], keeps=False)
    c.run()
    assert group.in_place_calls == [True]
    assert "restart in place not possible (a worker did not answer): replacing the group" in lines


# --- the warm process alone (no Ray) ---------------------------------------------------------


def _free_fd(start: int) -> int:
    """The first fd number from `start` that this process does not use (a fixed number like 60 may be
    a pipe or socket of pytest's or Ray's, and the pipes made next reuse numbers the test closes)."""
    n = start
    while True:
        try:
            os.fstat(n)
        except OSError:
            return n
        n += 1


def test_a_warm_script_sees_what_an_execd_one_sees(tmp_path):
    """argv, __file__, __name__, cwd, sys.path[0], environment, stdin, fds and exit code: the
    same whether forked from the warm process or started as `python script_probe.py`."""
    from orchestrator import zygote

    fd = _free_fd(900)  # the same number in both children; free here, so dup2 closes nothing of the test process
    z = zygote.Zygote(dict(os.environ))
    try:
        def run(warm: bool) -> tuple[int, dict, str]:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            extra_r, extra_w = os.pipe()
            os.dup2(extra_w, fd)
            os.close(extra_w)
            env = {**os.environ, "PROBE_FD": str(fd)}
            argv = [sys.executable, PROBE, "x y", "--exit", "3"]
            if warm:
                proc = z.spawn(argv, cwd=str(tmp_path), env=env, fds={1: out_w, 2: err_w, fd: fd})
            else:
                proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out_w,
                                        stderr=err_w, pass_fds=(fd,))
            for f in (out_w, err_w, fd, extra_r):
                os.close(f)
            with os.fdopen(out_r, "rb") as o, os.fdopen(err_r, "rb") as e:
                out, err = o.read(), e.read()
            return proc.wait(), json.loads(out), err.decode()

        warm_code, warm, warm_err = run(True)
        exec_code, cold, cold_err = run(False)
    finally:
        z.close()
    assert warm["torch_preloaded"] and not cold["torch_preloaded"]  # the warm path was taken
    assert warm["compiler_preloaded"] and not cold["compiler_preloaded"]
    assert warm_code == exec_code == 3 and warm_err == cold_err == "to stderr\n"
    assert warm["argv"] == [PROBE, "x y", "--exit", "3"] and warm["name"] == "__main__"
    assert warm["env"] and warm["env"]["PROBE_FD"] == str(fd)
    for key in ("argv", "file", "name", "cwd", "path0", "env", "globals", "spec", "package", "main_is_me", "stdin",
                "stdin_read", "fds"):
        assert warm[key] == cold[key], key


def test_the_warm_process_stays_single_threaded_and_its_children_die_with_it(tmp_path):
    from orchestrator import zygote

    one = {**os.environ, "OMP_NUM_THREADS": "1"}  # as Ray sets it for a 1-CPU worker
    z = zygote.Zygote(one)
    try:
        out_r, out_w = os.pipe()
        script = tmp_path / "sleeper.py"
        script.write_text("import os, sys, time\nprint(len(os.listdir('/proc/self/task')), flush=True)\n"
                          "time.sleep(600)\n")
        proc = z.spawn([sys.executable, str(script)], cwd=str(tmp_path), env=one,
                       fds={1: out_w, 2: out_w})
        os.close(out_w)
        with os.fdopen(out_r, "rb") as o:
            first = o.readline()
            assert first.strip() == b"1"  # no thread came over with the fork
            assert len(os.listdir(f"/proc/{z.proc.pid}/task")) == 1
            with pytest.raises(zygote.Unavailable, match="differs from the warm process's in OMP_NUM_THREADS"):
                z.spawn([sys.executable, str(script)], cwd=str(tmp_path), env={**one, "OMP_NUM_THREADS": "2"},
                        fds={1: 1, 2: 2})  # the child would keep the zygote's thread settings: exec instead
            z.proc.kill()  # the warm process dies: its child follows (PDEATHSIG)
            assert proc.wait() == -signal.SIGKILL
            assert o.read() == b""  # the child's end of the pipe closed: it is gone
        with pytest.raises(zygote.Unavailable, match="gone"):  # script.py then starts the script with exec
            z.spawn([sys.executable, str(script)], cwd=str(tmp_path), env=one, fds={1: 1, 2: 2})
    finally:
        z.close()


# --- restarts in place, on a real local Ray cluster ------------------------------------------


@pytest.mark.ray
def test_a_killed_script_restarts_in_place_and_resumes_from_its_snapshot(tmp_path, home, tiny_data, ray_address):
    snap = tmp_path / "snap.pt"
    cfg = tiny_config(tmp_path, tiny_data, entrypoint={"script": SCRIPT, "args": [
        "--steps", "30", "--snapshot", str(snap), "--sleep", "0.2", "--report"]},
        fault_tolerance={"max_restarts": 3, "backoff_s": 0.2})
    proc = launch_in_background(cfg, home=home, address=ray_address)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not snap.exists():
            time.sleep(0.3)
        assert snap.exists(), "no snapshot written"
        run_id = cli_json("runs", home=home)[-1]["id"]
        before = {w["rank"]: w["pid"] for w in cli_json("show", run_id, home=home)["meta"]["workers"]}
        victim = None
        while time.monotonic() < deadline and victim is None:
            victim = script_pid(before[1])
        assert victim is not None, "rank 1's script process not found"
        os.kill(victim, signal.SIGKILL)  # the script only: its worker lives
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    assert "RESTART 1/3" in out and "restarting in place" in out, out
    shown = cli_json("show", run_id, home=home)
    assert {w["rank"]: w["pid"] for w in shown["meta"]["workers"]} == before  # the same workers
    assert [a["status"] for a in shown["attempts"]] == ["failed", "completed"]
    e0, e1 = (json.loads(next(r["line"][4:] for r in lines_of(home, run_id, rank=0, attempt=a)
                              if r["line"].startswith("ENV "))) for a in (0, 1))  # rank 0 prints torchrun's variables
    assert e0["TORCHELASTIC_RESTART_COUNT"] == "0" and e1["TORCHELASTIC_RESTART_COUNT"] == "1"
    assert e0["MASTER_PORT"] != e1["MASTER_PORT"]  # a fresh rendezvous port for the new scripts
    resumed = [r["line"] for r in lines_of(home, run_id, rank=0, attempt=1) if r["line"].startswith("resumed from")]
    assert resumed and int(resumed[0].split()[-1]) >= 5
    assert lines_of(home, run_id, rank=0, attempt=1)[-1]["line"] == "done"
    assert lines_of(home, run_id, rank=1, attempt=0) and lines_of(home, run_id, rank=1, attempt=1)[-1]["line"] == "done"


@pytest.mark.ray
def test_exec_start_and_a_warm_start_give_a_script_the_same_view(tmp_path, home, tiny_data, ray_address):
    """The same comparison through `orchestrator launch`, with entrypoint.start warm and exec."""
    views = {}
    for start in ("warm", "exec"):
        cfg = tiny_config(tmp_path, tiny_data, scaling={"num_workers": 1},
                          entrypoint={"script": PROBE, "args": ["--flag"], "start": start})
        proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run_id = cli_json("runs", home=home)[-1]["id"]
        (line,) = [r["line"] for r in lines_of(home, run_id, rank=0) if r["line"].startswith("{")]
        views[start] = json.loads(line)
    warm, cold = views["warm"], views["exec"]
    assert warm["torch_preloaded"] and not cold["torch_preloaded"]
    assert warm["argv"] == [PROBE, "--flag"] and warm["stdin"] == "/dev/null"
    per_run = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "ORCHESTRATOR_WORKER_FD"}
    for key in ("argv", "file", "name", "cwd", "path0", "globals", "spec", "package", "main_is_me", "stdin"):
        assert warm[key] == cold[key], key
    assert warm["env"].keys() == cold["env"].keys()
    assert warm["env"]["TORCHELASTIC_USE_AGENT_STORE"] == cold["env"]["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert {k: v for k, v in warm["env"].items() if k not in per_run and not k.startswith("RAY_")} == \
        {k: v for k, v in cold["env"].items() if k not in per_run and not k.startswith("RAY_")}
    assert len(warm["fds"]) == len(cold["fds"])


def test_without_the_warm_process_the_script_is_execd_and_the_log_says_so(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from orchestrator import script, zygote
    from orchestrator.config import config_from_dict

    class Gone:
        def spawn(self, *a, **kw):
            raise zygote.Unavailable("the warm process is gone")

    monkeypatch.setattr(zygote, "get", lambda: Gone())
    cfg = config_from_dict({"entrypoint": {"script": PROBE, "args": ["--exit", "4"], "workdir": str(tmp_path)}})
    shipped = []
    metrics = SimpleNamespace(log_lines=SimpleNamespace(remote=lambda rank, batch: shipped.extend(batch)))
    lines = script.Lines(metrics, 0, SimpleNamespace(progress=0), every_s=60)
    read_fd, write_fd = os.pipe()
    try:
        proc = script._start(cfg, dict(os.environ), write_fd, lines)
        out = proc.stdout.read()
        assert proc.wait() == 4
    finally:
        os.close(write_fd)
        os.close(read_fd)
        lines.close()
    assert not json.loads(out)["torch_preloaded"] and json.loads(out)["cwd"] == str(tmp_path)
    assert [t for _, stream, t in shipped if stream == "stderr"] == [
        "orchestrator: warm start unavailable (the warm process is gone); starting the script with exec"]


# --- the scripts' store: hosted by rank 0's worker, fresh for every attempt (agent-store mode) ---


def _run_probes(env: dict, world: int = 2) -> dict[int, dict]:
    """script_probe.py --store as every rank of one group, started side by side; rank -> its STORE line."""
    procs = [subprocess.Popen([sys.executable, PROBE, "--store"], env={**env, "RANK": str(r), "WORLD_SIZE": str(world)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    out = {}
    for r, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stdout + stderr
        out[r] = json.loads(next(line[6:] for line in stdout.splitlines() if line.startswith("STORE ")))
    return out


def test_a_hosted_store_makes_every_script_a_client_and_each_attempt_gets_a_fresh_one():
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    from orchestrator import rendezvous
    from tests.script_probe import STALE_KEY

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "TORCHELASTIC_RESTART_COUNT": "1", "GLOO_SOCKET_IFNAME": "lo"}
    try:
        port = rendezvous.free_port()
        assert rendezvous.host_store("127.0.0.1", port, 60) is None
        TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=30)).set(STALE_KEY, "1")
        seen = _run_probes({**env, "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"})
        assert [v["use_agent_store"] for v in seen.values()] == ["True", "True"]
        assert all(v["listening"] and not v["hosted_here"] for v in seen.values())  # both clients of ours
        assert all(v["stale_key_visible"] for v in seen.values())  # the probe sees a key left in its store

        again = rendezvous.free_port()
        assert rendezvous.host_store("127.0.0.1", again, 60) is None  # the next attempt's
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()  # the old one is closed
        fresh = TCPStore("127.0.0.1", again, None, False, timeout=timedelta(seconds=30))
        assert not fresh.check([STALE_KEY])

        with socket.socket() as taken:  # a port that cannot be had: one line saying why, for the fallback
            taken.bind(("", 0))
            taken.listen()
            why = rendezvous.host_store("127.0.0.1", taken.getsockname()[1], 5)
        assert why and "\n" not in why
    finally:
        rendezvous.close_store()

    # the fallback (no hosted store): rank 0's script hosts it, as before agent-store mode
    seen = _run_probes({**env, "MASTER_PORT": str(rendezvous.free_port()), "TORCHELASTIC_USE_AGENT_STORE": "False"},
                       world=1)
    assert seen[0]["hosted_here"] and not seen[0]["stale_key_visible"]


@pytest.mark.ray
def test_a_sigkilled_script_restarts_in_place_on_a_fresh_store_hosted_by_its_worker(tmp_path, home, tiny_data,
                                                                                      ray_address):
    """Attempt 0: rank 0 sets a key in the store, rank 1 SIGKILLs itself; attempt 1 must not see the key.
    (exec'd scripts get the same store: test_exec_start_and_a_warm_start_give_a_script_the_same_view)"""
    cfg = tiny_config(tmp_path, tiny_data, entrypoint={"script": PROBE, "args": ["--store"]},
                      fault_tolerance={"max_restarts": 2, "backoff_s": 0.2})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "restarting in place" in proc.stdout and "cannot host" not in proc.stdout, proc.stdout
    run_id = cli_json("runs", home=home)[-1]["id"]
    assert [a["status"] for a in cli_json("show", run_id, home=home)["attempts"]] == ["failed", "completed"]
    seen = {}
    for a in (0, 1):
        for r in (0, 1):
            lines = [x["line"] for x in lines_of(home, run_id, rank=r, attempt=a)]
            seen[a, r] = json.loads(next(x[6:] for x in lines if x.startswith("STORE ")))
            if a == 1:
                assert lines[-1] == "done"
    assert all(v["use_agent_store"] == "True" and v["listening"] and not v["hosted_here"] for v in seen.values())
    assert seen[0, 0]["port"] == seen[0, 1]["port"] != seen[1, 0]["port"] == seen[1, 1]["port"]
    assert not seen[1, 0]["stale_key_visible"] and not seen[1, 1]["stale_key_visible"]
