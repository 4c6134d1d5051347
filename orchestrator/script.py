"""A user's script, unchanged, as one rank: a child process of the rank's worker with torchrun's
environment (rendezvous.join set it; the script calls init_process_group itself), its stdout and
stderr captured line by line into the run's logs, and `orchestrator.worker.log` calls (optional)
fed to tracking and the watchdog through a pipe.

Without worker.log, every output line counts as a sign of life: a script silent for longer than
hang.first_step_timeout_s is declared stalled.

The script's process is forked from a warm process beside the worker that imported torch
already (orchestrator/zygote.py; entrypoint.start: warm), or started with exec (entrypoint.start:
exec, and whenever the warm process is unavailable). After a failure that only took scripts
down, the driver keeps the workers and asks each for a new script process (`end_script`, then a
new attempt: worker_group.py).
Rank 0's worker hosts each attempt's TCPStore and the scripts connect to it as clients
(torchrun's agent-store mode: rendezvous.host_store).

`orchestrator stop` sends the script SIGTERM, as torchrun's agent does to its workers when it is
stopped, and waits up to fault_tolerance.stop_timeout_s for it to exit (a script that saves its
own snapshot on SIGTERM keeps that step); its exit then ends the run as stopped, not failed.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

from common.errors import UserCodeError
from orchestrator import rank, rendezvous, stopping, zygote
from orchestrator.config import Config, ScriptStart

TAIL = 30  # stderr lines kept for the failure report
_current = None  # this worker's running script process (subprocess.Popen or zygote.WarmProcess)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL when the worker that started it dies (a killed rank leaves no orphan
    holding the rendezvous port or a GPU)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the worker's stop() still kills it
        pass


class Lines:
    """Collects output lines and ships them to the metrics actor in batches, from its own thread."""

    def __init__(self, metrics, rank_: int, health, every_s: float):
        self.metrics, self.rank, self.health, self.every_s = metrics, rank_, health, every_s
        self.buf: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="script-lines", daemon=True)
        self._thread.start()

    def read(self, pipe, stream: str) -> None:
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self.lock:
                self.buf.append((time.time(), stream, text))
            if stream == "stderr":
                self.tail.append(text)
            self.health.progress += 1  # output is a sign of life

    def note(self, text: str) -> None:
        """A line of ours in the rank's log (stderr), beside the script's own."""
        with self.lock:
            self.buf.append((time.time(), "stderr", text))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.ship()

    def ship(self) -> None:
        with self.lock:
            batch, self.buf = self.buf, []
        if batch:
            try:
                self.metrics.log_lines.remote(self.rank, batch)
            except Exception:  # the metrics actor is restarting: these lines are lost, the run is not
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s + 5)
        self.ship()


def _read_worker_log(fd: int, services) -> None:
    """JSON lines from orchestrator.worker.log: metrics for tracking, steps for the watchdog."""
    health = services.health
    with os.fdopen(fd, "rb") as f:
        for raw in f:
            try:
                msg = json.loads(raw)
                step = int(msg["step"])
                services.sender.log({k: float(v) for k, v in msg["metrics"].items()}, step=step)
            except (ValueError, KeyError, TypeError):
                continue  # a malformed line from user code must not stop the run
            if step > health.step:
                health.step = step
            health.progress += 1


def run_script(cfg: Config, *, metrics, checkpoints=None, health_monitor=None, restore_step=None, restore_uri=None,
               skipped=(), relay=None) -> dict:
    """Run the script to its end; a non-zero exit raises (the group restarts under the restart
    policy, and the script resumes from its own snapshots, as under torchrun --max-restarts)."""
    e = cfg.entrypoint
    me = rendezvous.member()
    started = time.perf_counter()
    with rank.services(cfg, metrics=metrics, health_monitor=health_monitor, relay=relay) as s:
        s.health.phase = "script"
        read_fd, write_fd = os.pipe()
        env = {**os.environ, "ORCHESTRATOR_WORKER_FD": str(write_fd), "PYTHONUNBUFFERED": "1"}
        lines = Lines(metrics, me.rank, s.health, cfg.telemetry.flush_every_s)
        try:
            proc = _start(cfg, env, write_fd, lines)
        finally:
            os.close(write_fd)
        global _current
        _current = proc
        s.health.pid = proc.pid  # what a stall report's stack dump looks at
        stopping.on_request(lambda: _terminate(proc))
        readers = [threading.Thread(target=lines.read, args=(proc.stdout, "stdout"), daemon=True),
                   threading.Thread(target=lines.read, args=(proc.stderr, "stderr"), daemon=True),
                   threading.Thread(target=_read_worker_log, args=(read_fd, s), daemon=True)]
        for t in readers:
            t.start()
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
            for t in readers:
                t.join(timeout=10)
            lines.close()
        s.health.phase = "done"
    stopped = stopping.requested()
    if code != 0 and not stopped:
        why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        last = next((line for line in reversed(lines.tail) if line.strip()), "")
        raise UserCodeError(f"{os.path.basename(e.script)} {why}" + (f": {last.strip()}" if last else ""),
                            f"last lines of rank {me.rank}'s stderr:\n" + "\n".join(lines.tail))
    return {"steps": max(0, s.health.step + 1), "start_step": 0, "first_loss": None, "last_loss": None,
            "eval_loss": None, "train_time_s": time.perf_counter() - started, "stopped": stopped,
            "stopped_at": None, "exit_code": code}


def _start(cfg: Config, env: dict[str, str], log_fd: int, lines: Lines):
    """The script's process: warm from the zygote when configured and possible, else exec'd."""
    e = cfg.entrypoint
    argv = [sys.executable, e.script, *e.args]
    if e.start is ScriptStart.WARM:
        z = zygote.get()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = z.spawn(argv, cwd=e.workdir or os.getcwd(), env=env, fds={1: out_w, 2: err_w, log_fd: log_fd})
        except zygote.Unavailable as why:
            for f in (out_r, err_r):
                os.close(f)
            lines.note(f"orchestrator: warm start unavailable ({why}); starting the script with exec")
        else:
            proc.stdout, proc.stderr = os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb")
            return proc
        finally:
            os.close(out_w)
            os.close(err_w)
    return subprocess.Popen(argv, cwd=e.workdir or None, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(log_fd,), preexec_fn=_die_with_parent)


def prepare(cfg: Config) -> bool:
    """Before each attempt, in the rank's process: forget the previous attempt's stop listeners,
    and start the warm process now, so that its imports overlap the rest of the start (the
    variables the rendezvous sets later are not read at import). Returns whether a warm start is
    planned."""
    stopping.reset()
    if cfg.entrypoint.start is not ScriptStart.WARM:
        return False
    return zygote.get() is not None


def end_script(grace_s: float) -> int | None:
    """A restart in place, from the worker's control lane: SIGTERM to this rank's script (as
    torchrun's agent stops its workers), SIGKILL after grace_s; then the attempt's store, if this
    worker hosts it, is closed (the next attempt gets a fresh one). Returns the script's exit
    code, None if none was running."""
    try:
        return _end(grace_s)
    finally:
        rendezvous.close_store()


def _end(grace_s: float) -> int | None:
    proc = _current
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.poll()
    _terminate(proc)
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        while proc.poll() is None and time.monotonic() < deadline + 10:
            time.sleep(0.02)
    return proc.poll()


def _terminate(proc: subprocess.Popen) -> None:
    """`orchestrator stop`, from the worker's control lane: SIGTERM, as torchrun sends its workers."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
