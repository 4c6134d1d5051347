"""Node-local cache of remote shards, shared by the ranks of a node.

    <root>/<hash of dataset uri>/<split>/<sha256[:16]>.<NNNNN>.bin        a complete, verified shard
    <root>/<hash of dataset uri>/<split>/<sha256[:16]>.<NNNNN>.bin.lock   flock held while it is fetched
    <root>/.evict.lock                               flock held while making room

Each shard is downloaded at most once per node: a process takes the shard's lock, re-checks that
the file is still missing, downloads to a temporary name, checks size and sha256 against the
index, and renames it into place. Others waiting on the lock then find the file. A background
thread fetches shards the sampler says are coming next. The cache stays under `max_bytes` by
evicting least-recently-used shards that this process has not marked as needed soon; the ranks
of a node consume the same global batches in lockstep, so their "needed soon" sets agree. A
shard evicted while some rank has it memory-mapped stays readable by that rank (POSIX unlink).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import fsspec

from common.errors import DataError
from dataloading.index import Shard, join

CHUNK = 4 << 20
STALE_TMP_S = 3600


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "orchestrator-shards")


@contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # per open file: excludes other processes and threads
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ShardCache:
    def __init__(self, root: str | os.PathLike | None = None, *, max_bytes: int = 8 << 30,
                 storage_options: dict | None = None):
        self.root = Path(root or default_cache_dir())
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.storage_options = dict(storage_options or {})
        self.downloads = 0  # shards this process fetched (the others came from the cache)
        self.prefetch_error: Exception | None = None
        self._needed: set[Path] = set()
        self._have: set[Path] = set()  # seen complete here (another rank may still evict it)
        self._queue: queue.Queue = queue.Queue()
        self._queued: set[Path] = set()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def local_path(self, uri: str, shard: Shard) -> Path:
        # the content hash is in the name: a dataset re-prepared at the same URI never reads stale shards
        key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
        name = Path(shard.name)
        return self.root / key / name.parent / f"{shard.sha256[:16]}.{name.name}"

    # --- foreground -----------------------------------------------------------------------

    def get(self, uri: str, shard: Shard) -> Path:
        """Local path of a verified copy of `shard` of dataset `uri`, fetching it if needed."""
        path = self.local_path(uri, shard)
        self._fetch(uri, shard, path, prefetch=False)
        return path

    def _fetch(self, uri: str, shard: Shard, path: Path, *, prefetch: bool) -> None:
        try:
            os.utime(path)  # LRU clock
        except FileNotFoundError:
            with file_lock(path.with_name(path.name + ".lock")):
                if path.exists():  # another rank (or our prefetcher) got it while we waited
                    pass
                elif prefetch and not self._is_needed(path):
                    return  # training moved past it while we waited: fetching now would only evict it again
                else:
                    self._make_room(shard.bytes)
                    self._download(join(uri, shard.name), shard, path)
        with self._mutex:
            self._have.add(path)

    def _is_needed(self, path: Path) -> bool:
        with self._mutex:
            return path in self._needed

    def _download(self, url: str, shard: Shard, path: Path) -> None:
        fs, p = fsspec.core.url_to_fs(url, **self.storage_options)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
        digest, size = hashlib.sha256(), 0
        try:
            with fs.open(p, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    dst.write(chunk)
            if size != shard.bytes:
                raise DataError(f"{url}: shard has {size} bytes, the index says {shard.bytes}; truncated or replaced?")
            if digest.hexdigest() != shard.sha256:
                raise DataError(f"{url}: sha256 {digest.hexdigest()[:16]}... does not match the index "
                                f"({shard.sha256[:16]}...); the shard was changed or corrupted")
            os.replace(tmp, path)
        except FileNotFoundError:
            raise DataError(f"{url}: shard listed in the index is missing") from None
        finally:
            tmp.unlink(missing_ok=True)
        with self._mutex:
            self.downloads += 1

    def _make_room(self, incoming: int) -> None:
        with file_lock(self.root / ".evict.lock"):
            stats = {}
            now = time.time()
            for p in self.root.glob("*/**/*"):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if ".bin.tmp" in p.name and now - st.st_mtime > STALE_TMP_S:
                    p.unlink(missing_ok=True)  # left by a rank that died mid-download
                elif p.suffix == ".bin" and p.is_file():
                    stats[p] = st
            total = sum(s.st_size for s in stats.values()) + incoming
            with self._mutex:
                needed = set(self._needed)
            # oldest first; shards needed soon are kept even past the bound (never evict the present)
            for p in sorted((p for p in stats if p not in needed), key=lambda p: stats[p].st_mtime):
                if total <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                total -= stats[p].st_size
                with self._mutex:
                    self._have.discard(p)

    # --- background -----------------------------------------------------------------------

    def need(self, uri: str, shards: list[Shard]) -> None:
        """Mark these shards as needed soon (kept from eviction) and fetch missing ones in the background."""
        paths = [self.local_path(uri, s) for s in shards]
        with self._mutex:
            self._needed = set(paths)
            todo = [(s, p) for s, p in zip(shards, paths, strict=True)
                    if p not in self._queued and p not in self._have and not p.exists()]
            self._queued.update(p for _, p in todo)
            if todo and self._thread is None:
                self._thread = threading.Thread(target=self._prefetch_loop, name="shard-prefetch", daemon=True)
                self._thread.start()
        for s, p in todo:
            self._queue.put((uri, s, p))

    def _prefetch_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            uri, shard, path = item
            try:
                if self._is_needed(path):  # else training already moved past it
                    self._fetch(uri, shard, path, prefetch=True)
            except Exception as e:  # the foreground get() retries and raises with context
                self.prefetch_error = e
            finally:
                with self._mutex:
                    self._queued.discard(path)

    def close(self) -> None:
        if self._thread is not None:
            while not self._queue.empty():  # drop pending prefetches; only the current one finishes
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    with self._mutex:
                        self._queued.discard(item[2])
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
