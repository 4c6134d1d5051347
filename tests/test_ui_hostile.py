"""The UI server under a hostile client: a real server on 127.0.0.1, a real store, raw sockets.

Every test here failed on the server this replaced: overflowing numbers dropped the connection,
half-open connections each held a thread forever, a compare naming one run 2,000 times held the
global lock, other errors were HTML or no answer at all, and loopback had no way to ask for a token.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from orchestrator.store import Store
from orchestrator.ui.server import start_in_thread

WAIT_S = 60  # generous: a busy 2-core machine shared with other test runs


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("uihostile"))
    for rid, lr in (("a", 0.1), ("b", 0.2)):
        s.create_run(run_id=rid, name=f"run-{rid}", config={"optim": {"lr": lr}}, git_commit="c", host="h",
                     command="c", world_size=2)
        for rank in (0, 1):
            s.points.append(rid, rank, 0, {"train/loss": (np.arange(500), np.linspace(3, 1, 500) + rank)})
    s.close()
    return s.root


@pytest.fixture(scope="module")
def server(root):
    srv, _ = start_in_thread(store=Store(root), port=0)
    yield srv
    srv.shutdown()
    srv.server_close()


def request(port: int, path: str, *, method: str = "GET", headers: dict | None = None, timeout: float = WAIT_S):
    """(status, content type, body parsed as JSON when it is JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        ctype = r.getheader("Content-Type") or ""
        return r.status, ctype, json.loads(body) if ctype.startswith("application/json") else body
    finally:
        conn.close()


def port_of(server) -> int:
    return server.server_address[1]


@pytest.mark.parametrize("query, name", [
    ("buckets=1e400", "buckets"),
    ("buckets=nan", "buckets"),
    ("buckets=99999999999", "buckets"),
    ("buckets=abc", "buckets"),
    ("lo=-1e30", "lo"),
    ("lo=-1e30&hi=10", "lo"),
    ("lo=0&hi=9223372036854775807", "hi"),
    ("lo=0&hi=1e400", "hi"),
    ("lo=inf&hi=10", "lo"),
    ("rank=1e400", "rank"),
    ("rank=-1", "rank"),
    ("lo=2.5&hi=10", "lo"),
])
def test_out_of_range_numbers_are_a_400_json(server, query, name):
    code, ctype, body = request(port_of(server), f"/api/run/a/metric?key=train/loss&{query}")
    assert code == 400 and ctype.startswith("application/json"), (code, body)
    assert name in body["error"] and "must be" in body["error"]  # what was wrong, what is expected


def test_numbers_in_range_still_work(server):
    code, _, body = request(port_of(server), "/api/run/a/metric?key=train/loss&buckets=1e1&lo=100&hi=1.99e2")
    assert code == 200 and body["lo"] == 100 and body["hi"] == 199 and len(body["points"]) == 10
    code, _, body = request(port_of(server), "/api/run/a/metric?key=train/loss&buckets=4000&lo=-4611686018427387904")
    assert code == 200 and body["points"][-1]["last_step"] == 499  # the widest range there is: still answered


def test_every_error_is_json_and_the_connection_survives_a_bug(server, monkeypatch):
    port = port_of(server)

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.api, "runs", boom)
    code, ctype, body = request(port, "/api/runs")
    assert code == 500 and ctype.startswith("application/json") and "internal" in body["error"]
    monkeypatch.undo()
    for method, path, expected in (("POST", "/api/runs", 405), ("DELETE", "/", 405), ("GET", "/api/nope", 404),
                                   ("GET", "/api/run/nope", 404), ("GET", "/static/../server.py", 404),
                                   ("GET", "/api/compare?runs=a", 400)):
        code, ctype, body = request(port, path, method=method)
        assert code == expected and ctype.startswith("application/json") and body["error"], (method, path, code)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:  # not HTTP at all
        s.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        head = recv_all(s)
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert request(port, "/api/runs")[0] == 200


def recv_all(s: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read until the server closes the connection (or the socket's timeout)."""
    out = b""
    while len(out) < limit:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def test_half_open_connections_neither_hold_threads_nor_starve_others(server):
    port = port_of(server)
    threads_before = threading.active_count()
    socks: list[socket.socket] = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
            socks.append(s)
            if i % 2:  # half of them start a request and never finish it
                s.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        code, _, body = request(port, "/api/runs")  # another client is answered meanwhile
        assert code == 200 and {r["id"] for r in body["runs"]} == {"a", "b"}
        # the server took every connection (they came first) without a thread for each
        assert threading.active_count() - threads_before < 50
        # ... and drops each of them after a few seconds (the ones that started a request get a 408)
        deadline = time.monotonic() + 2 * WAIT_S
        answers = []
        for s in socks:
            s.settimeout(max(1.0, deadline - time.monotonic()))
            answers.append(recv_all(s))
        assert all(a == b"" for a in answers[0::2])
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers[1::2])
    finally:
        for s in socks:
            s.close()
    assert request(port, "/api/runs")[0] == 200


def test_keep_alive_and_pipelined_requests(server):
    port = port_of(server)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        for _ in range(3):  # one connection, several requests
            conn.request("GET", "/api/runs")
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["runs"]
    finally:
        conn.close()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as s:
        req = b"GET /api/run/a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        s.sendall(req + req[:-2] + b"Connection: close\r\n\r\n")  # two requests in one packet
        data = recv_all(s)
    assert data.count(b"HTTP/1.1 200") == 2


def test_compare_dedupes_and_caps_run_ids_while_others_are_answered(server):
    port = port_of(server)
    answers: dict[str, tuple] = {}

    def ask(name: str, path: str) -> None:
        answers[name] = request(port, path)

    jobs = [threading.Thread(target=ask, args=("same", "/api/compare?runs=" + ",".join(["a"] * 2000))),
            threading.Thread(target=ask, args=("two", "/api/compare?runs=" + ",".join(["a", "b", "run-a"] * 700))),
            threading.Thread(target=ask, args=("runs", "/api/runs"))]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(timeout=2 * WAIT_S)
    code, _, body = answers["same"]
    assert code == 400 and "two different runs" in body["error"]
    code, _, body = answers["two"]  # a by id, b, and a again by name: two runs
    assert code == 200 and [r["id"] for r in body["runs"]] == ["a", "b"]
    assert answers["runs"][0] == 200
    code, _, body = request(port, "/api/compare?runs=" + ",".join(f"r{i}" for i in range(21)))
    assert code == 400 and "at most 20" in body["error"]


def test_a_slow_request_does_not_hold_up_the_others(server, monkeypatch):
    """Each request reads through its own connection: no global lock for a slow one to hold."""
    import orchestrator.ui.api as api_module

    entered, release = threading.Event(), threading.Event()
    real_metric = api_module.metric

    def slow_metric(*args, **kwargs):
        entered.set()
        release.wait(2 * WAIT_S)
        return real_metric(*args, **kwargs)

    monkeypatch.setattr(api_module, "metric", slow_metric)
    port = port_of(server)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(request(port, "/api/run/a/metric?key=train/loss")))
    slow.start()
    try:
        assert entered.wait(WAIT_S)
        code, _, body = request(port, "/api/runs", timeout=WAIT_S / 2)
        assert code == 200 and len(body["runs"]) == 2
        assert request(port, "/api/run/b", timeout=WAIT_S / 2)[0] == 200
    finally:
        release.set()
        slow.join(2 * WAIT_S)
    assert answers and answers[0][0] == 200


def test_reads_cannot_write(server):
    import sqlite3

    store = server.api.open()
    try:
        assert [r["id"] for r in store.runs()] == ["a", "b"]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.add_note("a", "written through the UI")
    finally:
        store.close()


def test_a_full_pool_answers_503(root, monkeypatch):
    import orchestrator.ui.api as api_module
    from orchestrator.ui.connections import Limits

    entered, release = threading.Event(), threading.Event()
    real_metric = api_module.metric

    def slow_metric(*args, **kwargs):
        entered.set()
        release.wait(2 * WAIT_S)
        return real_metric(*args, **kwargs)

    monkeypatch.setattr(api_module, "metric", slow_metric)
    srv, _ = start_in_thread(store=Store(root), port=0, limits=Limits(workers=1, queue=0))
    port = port_of(srv)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(request(port, "/api/run/a/metric?key=train/loss")))
    slow.start()
    try:
        assert entered.wait(WAIT_S)
        code, ctype, body = request(port, "/api/runs")
        assert code == 503 and ctype.startswith("application/json") and "busy" in body["error"]
    finally:
        release.set()
        slow.join(2 * WAIT_S)
        srv.shutdown()
        srv.server_close()
    assert answers and answers[0][0] == 200


def test_token_on_loopback(root):
    srv, _ = start_in_thread(host="127.0.0.1", port=0, token="loopback-token", store=Store(root))
    port = port_of(srv)
    try:
        code, ctype, body = request(port, "/api/runs")
        assert code == 401 and ctype.startswith("application/json") and "token" in body["error"]
        assert request(port, "/api/runs", headers={"X-Token": "loopback-token"})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("with_token", [True, False])
def test_cli_first_line_says_whether_a_token_is_needed(root, with_token):
    env = {**os.environ, "ORCHESTRATOR_HOME": str(root)}
    cmd = [sys.executable, "-m", "orchestrator.cli", "ui", "--port", "0"] + (["--token"] if with_token else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/\S*", line)
        assert url, line
        port = int(url.group(1))
        if with_token:  # a fresh token, never on the command line (where `ps` would show it)
            assert "token required" in line and "?token=" in url.group(0)
            assert request(port, "/api/runs")[0] == 401
            token = url.group(0).split("?token=")[1]
            assert request(port, "/api/runs", headers={"X-Token": token})[0] == 200
            assert request(port, "/?token=" + token)[0] == 200
        else:
            assert "no token" in line and "?token=" not in url.group(0)
            assert request(port, "/api/runs")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_S)
        proc.stdout.close()
        proc.stderr.close()
