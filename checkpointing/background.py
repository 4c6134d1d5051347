"""One long-lived thread that runs a writer's jobs one at a time (a checkpoint's upload, a
snapshot's send), started with the first job.

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
    def __init__(self, name: str):
        self.name = name
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self.lock = threading.Lock()
        self.pending = 0
        self.thread: threading.Thread | None = None

    def submit(self, fn: Callable[..., object], *args) -> None:
        """Run fn(*args) after the jobs before it; returns at once."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self.thread.start()
        with self.lock:
            self.pending += 1
            self.idle.clear()
        self.jobs.put((fn, args))

    @property
    def busy(self) -> bool:
        return not self.idle.is_set()

    def wait(self) -> None:
        """Until every job submitted so far has run."""
        self.idle.wait()

    def close(self) -> None:
        self.wait()
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:  # a job says what went wrong itself; this one did not: its traceback, and on
                traceback.print_exc()
            finally:
                with self.lock:
                    self.pending -= 1
                    if self.pending == 0:
                        self.idle.set()
