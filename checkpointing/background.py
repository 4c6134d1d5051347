"""One long-lived thread that runs a writer's jobs one at a time (a checkpoint's upload, a
snapshot's send), started with the first job and ended after a minute without one.

Not a new thread per job: `Thread.start()` waits until the new thread runs, and a thread that then
goes straight into Python work (encoding, pickling, Ray calls) keeps the GIL for up to the
interpreter's switch interval (5 ms) before the training thread gets it back, at every checkpoint.
Waking a thread that already exists costs the training thread nothing: the job's Python work
runs once the training thread lets go of the GIL, which it does inside the next step's compute.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable


class Background:
    def __init__(self, name: str, *, idle_exit_s: float = 60.0):
        self.name, self.idle_exit_s = name, idle_exit_s
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self.lock = threading.Lock()
        self.pending = 0
        self.thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., object], *args) -> None:
        """Run fn(*args) after the jobs before it; returns at once."""
        with self.lock:
            self.pending += 1
            self.idle.clear()
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self.thread.start()
        self.jobs.put((fn, args))

    @property
    def busy(self) -> bool:
        return not self.idle.is_set()

    def wait(self) -> None:
        """Until every job submitted so far has run."""
        self.idle.wait()

    def close(self) -> None:
        """Wait for the jobs, then end the thread (a later submit starts another)."""
        self.wait()
        with self.lock:
            thread = self.thread
        if thread is not None:
            self.jobs.put(None)
            thread.join()

    def _serve(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=self.idle_exit_s)
            except queue.Empty:  # idle this long: the thread ends (a writer dropped without close() leaves none)
                job = None
            if job is None:  # close(), or idle
                with self.lock:
                    if self.pending == 0:
                        self.thread = None
                        return
                continue  # a job came in meanwhile (or the None was a stale close's)
            fn, args = job
            try:
                fn(*args)
            except Exception:  # jobs report their own errors; one that did not still must not end the thread
                traceback.print_exc()
            finally:
                with self.lock:
                    self.pending -= 1
                    if self.pending == 0:
                        self.idle.set()
