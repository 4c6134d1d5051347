"""A real S3 endpoint for tests: a moto server on 127.0.0.1 behind a fault-injecting proxy.

The proxy forwards every request to moto and counts write requests in flight (its `peak` is
what the staggering tests assert on). On a schedule it answers 503 SlowDown or 429, resets the
connection, truncates a response body, or delays; with `cap` set it answers 503 SlowDown to any
write above that many in flight, the way a throttling object store does.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
TOO_MANY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>TooManyRequests</Code>'
            b"<Message>Too many requests.</Message></Error>")
WRITES = ("PUT", "POST")


@dataclass
class Rule:
    """Answer the next `times` requests matching method/path with `action`."""

    action: str  # "503" | "429" | "reset" | "truncate" | "delay"
    method: str | None = None
    path_contains: str = ""
    times: int = 1  # -1: forever
    delay_s: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        return self.times != 0 and (self.method is None or self.method == method) and self.path_contains in path


@dataclass
class ProxyState:
    upstream: tuple[str, int]
    cap: int | None = None
    write_delay_s: float = 0.0  # hold each write this long so concurrency is visible
    rules: list[Rule] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    served: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    if rule.times > 0:
                        rule.times -= 1
                    self.served[rule.action] = self.served.get(rule.action, 0) + 1
                    return rule
        return None

    def reset_counters(self) -> None:
        with self.lock:
            self.peak = 0
            self.served = {}
            self.requests = []
            self.rules = []


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ProxyState

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        st = self.state
        method, path = self.command, self.path
        body = self._body()
        is_write = method in WRITES
        with st.lock:
            st.requests.append((method, path))
            if is_write:
                st.in_flight += 1
                st.peak = max(st.peak, st.in_flight)
                over = st.cap is not None and st.in_flight > st.cap
        try:
            if is_write and over:
                with st.lock:
                    st.served["cap"] = st.served.get("cap", 0) + 1
                return self._error(503, SLOW_DOWN)
            rule = st.take_rule(method, path)
            if rule is not None and rule.action in ("503", "429"):
                return self._error(int(rule.action), SLOW_DOWN if rule.action == "503" else TOO_MANY)
            if rule is not None and rule.action == "reset":
                return self._reset()
            if rule is not None and rule.action == "delay":
                time.sleep(rule.delay_s)
            if is_write and st.write_delay_s:
                time.sleep(st.write_delay_s)
            status, headers, data = self._forward(method, path, body)
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            length = dict((k.lower(), v) for k, v in headers).get("content-length") if method == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            if rule is not None and rule.action == "truncate" and len(data) > 1:
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
        finally:
            if is_write:
                with st.lock:
                    st.in_flight -= 1

    def _forward(self, method: str, path: str, body: bytes):
        conn = http.client.HTTPConnection(*self.state.upstream, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
            headers["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _error(self, status: int, xml: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        self.wfile.write(xml)

    def _reset(self) -> None:
        # SO_LINGER 0 turns close() into a TCP RST: the client sees "connection reset by peer"
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.state = ProxyState(upstream=upstream)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def add(self, action: str, *, method: str | None = None, path_contains: str = "", times: int = 1,
            delay_s: float = 0.0) -> Rule:
        rule = Rule(action=action, method=method, path_contains=path_contains, times=times, delay_s=delay_s)
        with self.state.lock:
            self.state.rules.append(rule)
        return rule

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server():
    """(host, port) of a moto S3 server on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield ("127.0.0.1", port)
    finally:
        server.stop()


@pytest.fixture
def s3(moto_server):
    """A fresh bucket behind a fresh fault proxy: (proxy, bucket, storage_options)."""
    import boto3

    bucket = f"ckpt-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=f"http://{moto_server[0]}:{moto_server[1]}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    proxy = FaultProxy(moto_server)
    options = storage_options(proxy.url)
    try:
        yield proxy, bucket, options
    finally:
        proxy.close()


def open_s3(uri: str, options: dict):
    """(fs, root) for a test bucket with s3fs's own retry loop off: faults must reach ours."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **options)
    fs.retries = 1
    return fs, root


def storage_options(endpoint_url: str) -> dict:
    """s3fs options with its own and botocore's retries off, so faults reach our retry layer."""
    return {
        "key": "testing", "secret": "testing", "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 60,
                          "read_timeout": 120},  # generous: moto shares a busy machine
    }


# --- simulated ranks: the training side of a checkpoint test, without Ray ---------------------


def tiny_model(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def run_ranks(fs, root: str, *, world_size: int, steps: int, cfg, coordinator=None, nodes=None,
              metrics_of=None, fs_of=None) -> tuple[list[list], object]:
    """Each rank in its own thread trains a tiny model for `steps` steps and checkpoints like the
    training loop does. Returns (per-rank SaveResults, coordinator)."""
    import random

    import torch

    from actors.checkpoint_coordinator import CheckpointCoordinator
    from checkpointing.client import LocalClient
    from checkpointing.writer import Checkpointer

    coordinator = coordinator or CheckpointCoordinator(
        "run-1", root, world_size, max_concurrent_writes=cfg.max_concurrent_writes,
        per_node_writes=cfg.per_node_writes, slot_lease_s=cfg.slot_lease_s)
    client = LocalClient(coordinator)
    results: list[list] = [[] for _ in range(world_size)]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            model, opt = tiny_model()
            ck = Checkpointer(fs=fs_of(rank) if fs_of else fs, root=root, client=client, rank=rank,
                              world_size=world_size, run_id="run-1", config={"run": {"seed": 0}}, cfg=cfg,
                              node=(nodes or {}).get(rank, "node-0"), rng=random.Random(rank), poll_s=0.01,
                              warn=lambda msg: None)
            for step in range(1, steps + 1):
                loss = model(torch.randn(8, 16)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if ck.due(step, step == steps):
                    metrics = metrics_of(step) if metrics_of else {}
                    ck.save(step, model=model, optimizer=opt, sampler_state={"samples_consumed": step * 8},
                            metrics=metrics)
            results[rank] = ck.close()
        except BaseException as e:  # surfaced by the caller
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a simulated rank did not finish in 120 s"
    if errors:
        raise errors[0]
    return results, coordinator
