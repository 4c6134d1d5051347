"""Connections of the UI server: request heads are collected without a thread each, and only
complete requests reach a bounded pool of workers.

A stdlib ThreadingHTTPServer gives every connection a thread that blocks until the client has
sent its request, so idle or half-sent connections pin threads forever, before any token check.
Here one thread (`serve_forever`) accepts connections and buffers each request head without
blocking; a connection that has not sent a whole head within `head_timeout_s` (of being accepted,
or of its previous answer) is closed, with a 408 if it had started one. A complete head goes to
one of `workers` threads; `queue` more may wait for one, beyond that the answer is 503. A kept-
alive connection comes back here after each answer.
"""

from __future__ import annotations

import json
import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    workers: int = 8  # requests handled at once
    queue: int = 32  # complete requests waiting for a worker; more are answered 503
    pending: int = 512  # connections yet to send a request; beyond, the longest waiting is closed
    head_timeout_s: float = 10.0  # to send a whole request head
    write_timeout_s: float = 30.0  # per write of an answer to a client that does not read
    max_head: int = 65536  # bytes of request line + headers
    backlog: int = 128


class Waiting:
    """A connection whose next request head is still arriving."""

    __slots__ = ("sock", "addr", "buf", "deadline")

    def __init__(self, sock: socket.socket, addr, buf: bytes, deadline: float):
        self.sock, self.addr, self.buf, self.deadline = sock, addr, buf, deadline


def head_complete(buf: bytes) -> bool:
    return b"\r\n\r\n" in buf or b"\n\n" in buf


def canned(code: int, reason: str, message: str) -> bytes:
    """A whole JSON error answer, sent without a worker (the connection is closed after it)."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n")
    if code == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


def close(sock: socket.socket, answer: bytes | None = None) -> None:
    try:
        if answer:
            sock.setblocking(False)
            sock.send(answer)  # best effort: a few hundred bytes fit any socket buffer
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class ConnectionServer:
    """Subclasses implement `handle`; `serve_forever`, `shutdown`, `server_close` and
    `server_address` behave as in socketserver."""

    def __init__(self, address: tuple[str, int], limits: Limits | None = None):
        self.limits = limits or Limits()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.limits.backlog)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._lock = threading.Lock()
        self._in_flight = 0  # requests handed to workers and not yet answered
        self._back: list[Waiting] = []  # kept-alive connections the workers hand back
        self._jobs: queue.SimpleQueue[Waiting | None] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()

    def handle(self, sock: socket.socket, addr, head: bytes) -> bytes | None:
        """Answer the request(s) in `head`; return the bytes received beyond them if the
        connection stays open, None to close it."""
        raise NotImplementedError

    # --- the collecting thread ---------------------------------------------------------------

    def serve_forever(self) -> None:
        self._done.clear()
        workers = [threading.Thread(target=self._work, name=f"ui-worker-{i}", daemon=True)
                   for i in range(self.limits.workers)]
        for w in workers:
            w.start()
        waiting: dict[socket.socket, Waiting] = {}  # insertion order is deadline order
        sel = selectors.DefaultSelector()
        sel.register(self.socket, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                first = next(iter(waiting.values()), None)
                timeout = 1.0 if first is None else min(1.0, max(0.0, first.deadline - time.monotonic()))
                for key, _ in sel.select(timeout):
                    if key.fileobj is self.socket:
                        self._accept(sel, waiting)
                    elif key.fileobj is self._wake_r:
                        self._take_back(sel, waiting)
                    elif key.fileobj in waiting:  # (not closed earlier in this round)
                        w = waiting[key.fileobj]
                        try:
                            self._read(sel, waiting, w)
                        except Exception:  # a bug: lose this connection, not the server
                            log.exception("ui: reading from %s failed", w.addr)
                            if waiting.get(w.sock) is w:
                                self._drop(sel, waiting, w)
                self._expire(sel, waiting)
        finally:
            for w in waiting.values():
                close(w.sock)
            sel.close()
            for _ in workers:
                self._jobs.put(None)
            self._done.set()

    def _add(self, sel, waiting: dict, w: Waiting) -> None:
        sel.register(w.sock, selectors.EVENT_READ)
        waiting[w.sock] = w
        if len(waiting) > self.limits.pending:
            self._drop(sel, waiting, next(iter(waiting.values())))

    def _drop(self, sel, waiting: dict, w: Waiting, answer: bytes | None = None) -> None:
        sel.unregister(w.sock)
        del waiting[w.sock]
        close(w.sock, answer)

    def _accept(self, sel, waiting: dict) -> None:
        for _ in range(64):  # then look at the others again
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: make room
                log.warning("ui: cannot accept a connection: %s", e)
                if waiting:
                    self._drop(sel, waiting, next(iter(waiting.values())))
                return
            sock.setblocking(False)
            self._add(sel, waiting, Waiting(sock, addr, b"", time.monotonic() + self.limits.head_timeout_s))

    def _read(self, sel, waiting: dict, w: Waiting) -> None:
        try:
            data = w.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self._drop(sel, waiting, w)
        w.buf += data
        if head_complete(w.buf):
            sel.unregister(w.sock)
            del waiting[w.sock]
            self._dispatch(w)
        elif len(w.buf) > self.limits.max_head:
            self._drop(sel, waiting, w, canned(431, "Request Header Fields Too Large",
                                               f"the request head is over {self.limits.max_head} bytes"))

    def _expire(self, sel, waiting: dict) -> None:
        now = time.monotonic()
        while waiting:
            w = next(iter(waiting.values()))
            if w.deadline > now:
                return
            answer = canned(408, "Request Timeout", f"no whole request within {self.limits.head_timeout_s:g}s")
            self._drop(sel, waiting, w, answer if w.buf else None)

    def _take_back(self, sel, waiting: dict) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # drained (BlockingIOError) or closed
            pass
        with self._lock:
            back, self._back = self._back, []
        for w in back:
            w.sock.setblocking(False)
            w.deadline = time.monotonic() + self.limits.head_timeout_s
            if head_complete(w.buf):  # pipelined: the next request is here already
                self._dispatch(w)
            else:
                self._add(sel, waiting, w)

    def _dispatch(self, w: Waiting) -> None:
        with self._lock:
            busy = self._in_flight >= self.limits.workers + self.limits.queue
            if not busy:
                self._in_flight += 1
        if busy:
            close(w.sock, canned(503, "Service Unavailable",
                                 f"server busy: {self.limits.workers + self.limits.queue} requests in progress; retry"))
        else:
            self._jobs.put(w)

    # --- workers -----------------------------------------------------------------------------

    def _work(self) -> None:
        while (w := self._jobs.get()) is not None:
            rest = None
            try:
                w.sock.setblocking(True)
                w.sock.settimeout(self.limits.write_timeout_s)
                rest = self.handle(w.sock, w.addr, w.buf)
            except Exception:  # handle() answers its own errors; this is a bug in it
                log.exception("ui: request from %s failed", w.addr)
            with self._lock:
                self._in_flight -= 1
                keep = rest is not None and not self._stop.is_set()
                if keep:
                    self._back.append(Waiting(w.sock, w.addr, rest, 0.0))
            if keep:
                self._wake()
            else:
                close(w.sock)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # a wake-up is pending already, or the server is closed
            pass

    # --- stopping ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait for it."""
        self._stop.set()
        self._wake()
        self._done.wait()

    def server_close(self) -> None:
        self._stop.set()
        self._wake()
        self.socket.close()
        with self._lock:
            back, self._back = self._back, []
        for w in back:
            close(w.sock)
        self._wake_r.close()
        self._wake_w.close()
