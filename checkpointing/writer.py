"""The async checkpoint writer, one per rank.

save() blocks only while the state is copied to host memory; a background thread encodes and
uploads it. At most one checkpoint is in flight per rank: save() first waits for the previous
one, so host memory holds at most one extra copy of the state. Each file upload takes a write
slot from the coordinator (after a jittered start), retries throttling and transient errors with
backoff, and checks the stored size. Rank 0 then waits for every rank's report and commits by
writing the manifest, last; a checkpoint that cannot be written is reported as failed and
training goes on.

A sharded state (FSDP) is encoded by DCP, whose save is a collective across ranks: it runs in the
same background thread, over a process group of its own (gloo) so it never interleaves with the
training step's collectives, and before any upload, so every rank reaches it.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from checkpointing import format, manifest
from checkpointing.background import Background
from checkpointing.config import CheckpointConfig
from checkpointing.errors import WriteFailed
from checkpointing.layout import MANIFEST, step_dir
from checkpointing.retention import apply_retention
from checkpointing.retry import with_retries

LogFn = Callable[[int, dict[str, float]], None]


@dataclass
class SaveResult:
    step: int
    status: str  # "uploaded" (this rank's part is stored), "committed" (rank 0 wrote the manifest), "failed"
    bytes: int = 0
    blocked_s: float = 0.0
    upload_s: float = 0.0
    error: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)


class FileWriter:
    """Writes one file: jittered start, a write slot, retries with backoff, stored size checked."""

    def __init__(self, fs, client, *, rank: int, node: str, cfg: CheckpointConfig,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, poll_s: float = 0.05):
        self.fs = fs
        self.client = client
        self.rank = rank
        self.node = node
        self.cfg = cfg
        self.sleep = sleep
        self.clock = clock
        self.rng = rng or random.Random()
        self.poll_s = poll_s
        self.retried = 0
        # s3fs uploads a big file as parts in parallel; one part at a time keeps one slot = one request
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.put_kwargs = {"max_concurrency": 1} if {"s3", "s3a"} & set(protocols) else {}

    def write(self, path: str, data: bytes, *, jitter: bool = True) -> None:
        if jitter:  # ranks that reach a checkpoint together do not all ask at the same instant
            self.sleep(self.rng.uniform(0, self.cfg.start_jitter_s))
        slot = self._acquire(path)
        try:
            self.retry(lambda: self._put(path, data))
        finally:
            try:
                self.client.call("release", slot)
            except Exception:  # the lease expires on its own
                pass

    def retry(self, fn: Callable[[], Any]) -> Any:
        return with_retries(fn, retries=self.cfg.retries, backoff_s=self.cfg.backoff_s,
                            max_backoff_s=self.cfg.max_backoff_s, sleep=self.sleep, rng=self.rng,
                            on_retry=self._count)

    def _count(self, attempt: int, error: BaseException, delay: float) -> None:
        self.retried += 1

    def _acquire(self, path: str) -> int:
        deadline = self.clock() + self.cfg.commit_timeout_s
        for attempt in range(1_000_000):
            slot = self.client.call("acquire", self.rank, self.node)
            if slot is not None:
                return slot
            if self.clock() > deadline:
                break
            # jittered, so waiters do not march in step; growing, so many ranks do not flood the actor
            # (capped low: a freed slot should not sit idle while its next writer sleeps)
            self.sleep(min(self.poll_s * 1.5 ** min(attempt, 10), 0.25) * (0.5 + self.rng.random()))
        raise WriteFailed(f"{path}: no write slot within {self.cfg.commit_timeout_s:g}s")

    def _put(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data, **self.put_kwargs)
        self.fs.invalidate_cache(path)
        stored = self.fs.size(path)
        if stored != len(data):
            raise OSError(f"{path}: wrote {len(data)} bytes but the store has {stored}")


class Checkpointer:
    """What the training loop calls: due(), save() and close()."""

    def __init__(self, *, fs, root: str, client, rank: int, world_size: int, run_id: str, config: dict,
                 cfg: CheckpointConfig, node: str = "local", sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.perf_counter, rng: random.Random | None = None,
                 poll_s: float = 0.05, warn: Callable[[str], None] | None = None,
                 flush: Callable[[], Any] = lambda: None):
        self.fs = fs
        self.flush = flush  # the rank's metrics, delivered before its part of a checkpoint is reported
        self.root = root.rstrip("/")
        self.client = client
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id
        self.config = config
        self.cfg = cfg
        self.sleep = sleep
        self.clock = clock
        self.poll_s = poll_s
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.files = FileWriter(fs, client, rank=rank, node=node, cfg=cfg, sleep=sleep, rng=rng, poll_s=poll_s)
        self.uploader = Background(f"ckpt-upload-{rank}")
        self.current: SaveResult | None = None
        self.results: list[SaveResult] = []
        self.process_group = None  # for sharded saves; made on the first one, by every rank at once

    def due(self, steps_done: int, is_last: bool) -> bool:
        every = self.cfg.every_steps
        return is_last or (every > 0 and steps_done % every == 0)

    def save(self, step: int, *, model, optimizer, sampler_state: dict, metrics: dict[str, float] | None = None,
             log: LogFn | None = None) -> None:
        """Checkpoint after `step` optimizer steps. Blocks for the previous upload (if still
        running) and the copy to host memory; returns while the upload runs."""
        t0 = self.clock()
        self._finish_previous(log)
        host = format.capture(step=step, rank=self.rank, world_size=self.world_size, run_id=self.run_id,
                              model=model, optimizer=optimizer, sampler_state=sampler_state, config=self.config)
        if format.SHARDS in host and self.process_group is None and self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                self.process_group = dist.new_group(backend="gloo")
        blocked = self.clock() - t0
        if log is not None:
            log(step - 1, {"ckpt/blocked_s": blocked})
        self.current = SaveResult(step=step, status="running", blocked_s=blocked)
        plain_metrics = {k: float(v) for k, v in (metrics or {}).items()}
        # handed over in a box the job empties, so the host copy is freed as soon as it is written
        self.uploader.submit(self._upload, self.current, [host], plain_metrics)

    def wait(self) -> SaveResult | None:
        """Wait for the checkpoint in flight (if any) and return its result."""
        self.uploader.wait()
        return self.current

    def close(self, log: LogFn | None = None) -> list[SaveResult]:
        """Wait for the last checkpoint; call at the end of training."""
        self._finish_previous(log)
        self.uploader.close()
        return self.results

    def _finish_previous(self, log: LogFn | None) -> None:
        if self.current is None:
            return
        result = self.wait()
        self.current = None
        self.results.append(result)
        if log is not None:
            log(result.step - 1, {"ckpt/upload_s": result.upload_s, "ckpt/bytes": float(result.bytes),
                                  "ckpt/failed": float(result.status == "failed")})

    # --- background thread -----------------------------------------------------------------

    def step_path(self, step: int) -> str:
        return f"{self.root}/{step_dir(step)}"

    def _upload(self, result: SaveResult, box: list[dict[str, Any]], metrics: dict[str, float]) -> None:
        t0 = self.clock()
        host = box.pop()
        path = self.step_path(result.step)
        try:
            if format.SHARDS in host:  # the collective first, before anything else can fail
                host.update(format.encode_sharded(host.pop(format.SHARDS).state, process_group=self.process_group))
            self.files.retry(lambda: self.fs.makedirs(path, exist_ok=True))
            for i, (name, obj) in enumerate(host.items()):
                data = obj if isinstance(obj, bytes) else format.encode(obj)
                listed = manifest.entry(name, data, self.rank).to_dict()  # hashing before taking a slot
                self.files.write(f"{path}/{name}", data, jitter=i == 0)
                result.files.append(listed)
                result.bytes += len(data)
            result.upload_s = self.clock() - t0
            result.status = "uploaded"
            report = {"files": result.files, "bytes": result.bytes, "blocked_s": result.blocked_s,
                      "upload_s": result.upload_s}
        except Exception as e:
            result.upload_s = self.clock() - t0
            result.status = "failed"
            result.error = f"rank {self.rank}: {type(e).__name__}: {_first_line(e)}"
            report = {"error": result.error}
        del host  # free the host copy before waiting for the other ranks
        try:
            # what a restore from this checkpoint will not replay is stored before it can commit: here,
            # not on the training thread, where the round trip (through the node's relay) stalled the step
            self.flush()
            self.client.call("report", result.step, self.rank, report)
            if self.rank == 0:
                self._commit(result, metrics)
        except Exception as e:
            result.status = "failed"
            result.error = result.error or f"rank {self.rank}: {type(e).__name__}: {_first_line(e)}"
        if result.status == "failed":
            self.warn(f"checkpoint step {result.step} failed ({result.error}); training goes on")

    def _commit(self, result: SaveResult, metrics: dict[str, float]) -> None:
        """Rank 0: wait for every rank's report, then write the manifest (the commit) last."""
        step, path = result.step, self.step_path(result.step)
        deadline = self.clock() + self.cfg.commit_timeout_s
        for attempt in range(1_000_000):
            shards = self.client.call("shards", step)
            errors = [s["error"] for s in shards.values() if "error" in s]
            if errors:
                return self._fail(result, "; ".join(errors))
            if len(shards) >= self.world_size:
                break
            if self.clock() > deadline:
                missing = sorted(set(range(self.world_size)) - set(shards))
                return self._fail(result, f"ranks {missing} did not report within {self.cfg.commit_timeout_s:g}s")
            self.sleep(min(self.poll_s * 1.5 ** min(attempt, 10), 0.1))  # one poller per run: keep it prompt
        else:
            return self._fail(result, "gave up waiting for the ranks' reports")
        files = [f for s in shards.values() for f in s["files"]]
        blocked = max(s["blocked_s"] for s in shards.values())
        upload = max(s["upload_s"] for s in shards.values())
        m = manifest.build(step=step, run_id=self.run_id, world_size=self.world_size, files=files,
                           metrics=metrics, timings={"blocked_s": blocked, "upload_s": upload})
        try:
            self.files.write(f"{path}/{MANIFEST}", manifest.encode(m), jitter=False)
        except Exception as e:
            return self._fail(result, f"manifest: {type(e).__name__}: {_first_line(e)}")
        result.status = "committed"
        result.bytes = m["bytes"]
        self.client.call("finish", step, "committed", bytes=m["bytes"], blocked_s=blocked, upload_s=upload, uri=path)
        try:
            apply_retention(self.fs, self.root, self.cfg, retry=self.files.retry)
        except Exception as e:  # a failed delete only leaves an extra checkpoint behind
            self.warn(f"checkpoint retention after step {step} failed: {type(e).__name__}: {_first_line(e)}")

    def _fail(self, result: SaveResult, error: str) -> None:
        result.status = "failed"
        result.error = error
        self.client.call("finish", result.step, "failed", uri=self.step_path(result.step), error=error,
                         blocked_s=result.blocked_s, upload_s=result.upload_s)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
