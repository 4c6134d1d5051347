"""`orchestrator server` and RemoteStore: a run writes its tracking over HTTP, batches are applied
once, nothing is lost through a server restart, bad tokens and unreachable servers end in one line.

Servers run as real `orchestrator server` processes (killed and restarted where the test needs
it) or in-process on 127.0.0.1:0; every wait is bounded and waits for an event, not a time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from common.errors import StoreError
from orchestrator.ingest_wire import CONTENT_TYPE, encode, points_op
from orchestrator.remote_store import BATCH_PATH, RemoteStore
from orchestrator.store import Store
from orchestrator.ui.server import start_in_thread
from tests.conftest import ORCH, REPO, cli_json, run_cli, tiny_config

START_WAIT_S = 120  # a busy machine can take long to import and bind


# --- helpers ---------------------------------------------------------------------------------


class ServerProcess:
    """`orchestrator server` in a child process, on a free port (or a given one, for a restart)."""

    def __init__(self, store_dir: Path, *, port: int = 0, token: str | None = None):
        self.store_dir, self.token = store_dir, token
        args = [*ORCH, "server", "--port", str(port), "--store", str(store_dir)]
        env = {**os.environ, "ORCHESTRATOR_HOME": str(store_dir.parent / "server-home")}
        if token:
            args += ["--token", token]
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self._first_line()
        assert "orchestrator server at http://127.0.0.1:" in line, line
        self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        self.uri = f"http://127.0.0.1:{self.port}"

    def _first_line(self) -> str:
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_WAIT_S)
        if not got or not got[0]:
            self.proc.kill()
            raise AssertionError(f"server did not start: {self.proc.stderr.read() if self.proc.poll() is not None else ''}")
        return got[0]

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, so only what was committed survives."""
        self.proc.kill()
        self.proc.wait(60)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)
        return self.proc.returncode


class InProcess:
    """A server in this process (cheaper than a child process where no restart is needed)."""

    def __init__(self, store_dir: Path, *, token: str | None = None):
        self.store_dir = store_dir
        self.store = Store(store_dir)
        self.srv, _ = start_in_thread(store=self.store, port=0, token=token)
        self.port = self.srv.server_address[1]
        self.uri = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
        self.store.close()


@pytest.fixture
def server(tmp_path):
    s = InProcess(tmp_path / "server-store")
    yield s
    s.stop()


def post(url: str, body: bytes, ctype: str = CONTENT_TYPE, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_run(store, run_id: str = "r1") -> None:
    store.create_run(run_id=run_id, name=run_id, config={"a": 1}, git_commit=None, host="h", command="c",
                     world_size=2)


def points_of(store: Store, run_id: str, key: str, rank: int) -> tuple[list[int], list[float], int]:
    """Steps and values as stored, and how many rows the series holds (duplicates would show there)."""
    p = store.rank_points(run_id, key, rank)
    stored = sum(n for _, r, _, n in store.points.find(run_id, key) if r == rank)
    return p.steps.tolist(), p.values.tolist(), stored


# --- a launch writing to a server ------------------------------------------------------------


@pytest.mark.ray
def test_launch_writes_everything_to_the_server(tmp_path, home, tiny_data, ray_address, server):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 12, "eval_every": 6, "eval_batches": 1},
                      tracking={"uri": server.uri})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"store {server.uri}" in proc.stdout
    assert not (home / "store.db").exists()  # nothing written to the local store

    store = ["--store", str(server.store_dir)]
    (run,) = cli_json("runs", *store, home=home)
    assert run["status"] == "completed" and run["id"] in proc.stdout
    show = cli_json("show", run["id"], *store, home=home)
    assert show["world_size"] == 2 and show["config"]["tracking"]["uri"] == server.uri
    assert show["summary"]["last_loss"] < show["summary"]["first_loss"]
    assert sorted(w["rank"] for w in show["meta"]["workers"]) == [0, 1]  # update_meta from the controller
    keys = set(cli_json("metrics", run["id"], *store, home=home)["keys"])
    assert {"train/loss", "train/lr", "eval/loss", "data/batch_fingerprint", "sys/process_rss_bytes"} <= keys
    for rank in (0, 1):
        pts = cli_json("metrics", run["id"], "--key", "train/loss", "--rank", str(rank), *store, home=home)["points"]
        assert [p["step"] for p in pts] == list(range(12))
    s = Store(server.store_dir, create=False)
    try:
        (attempt,) = s.attempts(run["id"])
        assert attempt["status"] == "completed" and attempt["ended_at"] is not None
        row = s.db.execute("SELECT driver_beat FROM runs WHERE id = ?", (run["id"],)).fetchone()
        assert row[0] is not None  # the driver's beats arrived
    finally:
        s.close()


# --- batches: once each, in order ------------------------------------------------------------


@pytest.fixture
def inproc(server):
    return server.uri, server.store_dir


def test_a_batch_sent_twice_is_stored_once(inproc):
    uri, root = inproc
    r = RemoteStore(uri)
    new_run(r)
    r.close()
    op, arrays, _ = points_op("r1", 0, 0, None, {"k": (np.arange(5), np.arange(5) * 2.0)})
    body = encode("client-aaaa", 1, [[op]], arrays)
    assert post(uri + BATCH_PATH, body) == (200, {"applied": True, "points": 5})
    assert post(uri + BATCH_PATH, body) == (200, {"applied": False, "points": 0})  # the answer was lost: sent again
    op3, arrays3, _ = points_op("r1", 0, 0, None, {"k": (np.arange(5, 8), np.zeros(3))})
    status, answer = post(uri + BATCH_PATH, encode("client-aaaa", 3, [[op3]], arrays3))
    assert status == 409 and "batch 3" in answer["error"] and "before batch 2" in answer["error"]
    s = Store(root)
    assert points_of(s, "r1", "k", 0) == ([0, 1, 2, 3, 4], [0.0, 2.0, 4.0, 6.0, 8.0], 5)
    s.close()


def test_both_backends_take_the_same_batches(tmp_path, store_uri):
    """SQLite and PostgreSQL behind the server: a transaction's points and events, an event updated
    by its reference, a re-sent batch stored once, reads back."""
    from orchestrator.store import open_store

    store = open_store(store_uri)
    srv, _ = start_in_thread(store=store, port=0)
    uri = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        r = RemoteStore(uri, private=True)
        new_run(r)
        r.start_attempt("r1", 0, resumed_from_step=None)
        with r.transaction():
            r.points.append("r1", 0, 0, {"loss": (np.arange(100), np.linspace(1, 0, 100))}, seq=1)
            ref = r.add_event("r1", kind="stall", severity="error", message="stalled", step=50)
        r.update_event_data(ref, {"culprit": 1})
        assert r.points.append("r1", 0, 0, {"loss": (np.arange(100), np.zeros(100))}, seq=1) == 0  # sent again
        r.finish_run("r1", "completed")
        assert r.run("r1")["status"] == "completed" and r.latest_attempt("r1") == 0
        r.close()
        check = open_store(store_uri)
        steps, vals, stored = points_of(check, "r1", "loss", 0)
        assert steps == list(range(100)) and vals == np.linspace(1, 0, 100).tolist() and stored == 100
        (event,) = check.events("r1", kind="stall")
        assert event["data"] == {"culprit": 1} and event["step"] == 50
        check.close()
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


def test_bad_batches_are_refused_with_one_line(inproc):
    uri, _ = inproc
    status, answer = post(uri + BATCH_PATH, b"hello")
    assert status == 400 and "not an ingest batch" in answer["error"]
    op, arrays, _ = points_op("r1", 0, 0, None, {"k": (np.arange(4), np.zeros(4))})
    status, answer = post(uri + BATCH_PATH, encode("client-bbbb", 1, [[op]], arrays)[:-8])  # cut short
    assert status == 400 and "needs 64 bytes" in answer["error"]
    status, answer = post(uri + BATCH_PATH, encode("client-bbbb", 1, [[{"op": "drop_table"}]], []))
    assert status == 400 and "unknown op 'drop_table'" in answer["error"]
    bad = {"op": "finish_run", "run_id": "r1", "status": "exploded", "error": None, "summary": None}
    status, answer = post(uri + BATCH_PATH, encode("client-bbbb", 1, [[bad]], []))
    assert status == 400 and "status 'exploded'" in answer["error"]
    # points for a run the store does not have: never filed under a run that does not exist
    status, answer = post(uri + BATCH_PATH, encode("client-bbbb", 1, [[op]], arrays))
    assert status == 503 and "no run 'r1'" in answer["error"]  # (its create_run may still be on its way)
    # a web page can only send simple content types without asking first: refused
    status, answer = post(uri + BATCH_PATH, b"x", ctype="text/plain")
    assert status == 415
    status, answer = post(uri + BATCH_PATH, b"x", headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in answer["error"]


def test_mlflow_paths_reach_the_mlflow_api(inproc):
    uri, _ = inproc
    status, answer = post(uri + "/api/2.0/mlflow/no-such/endpoint", b"{}", ctype="application/json")
    assert status == 501 and answer["error_code"] and "no-such/endpoint" in answer["message"]


class CuttingProxy:
    """Forwards 127.0.0.1:port to the server, but drops the answers to the first `cut` requests
    (the server has applied them): the client must send them again."""

    def __init__(self, upstream_port: int, cut: int):
        self.upstream, self.cut = upstream_port, cut
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answered = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=self._copy, args=(client, up, False), daemon=True).start()
        self._copy(up, client, True)

    def _copy(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if answers and self.cut > 0:
                    self.cut -= 1
                    break  # the answer never reaches the client
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # shutdown first: a plain close would not wake the other direction's recv
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_lost_answers_are_retried_without_duplicates(inproc):
    uri, root = inproc
    direct = RemoteStore(uri)
    new_run(direct)
    direct.close()
    proxy = CuttingProxy(int(uri.rsplit(":", 1)[1]), cut=3)
    said: list[str] = []
    r = RemoteStore(f"http://127.0.0.1:{proxy.port}", say=said.append)
    try:
        for i in range(3):
            with r.transaction():  # as the metrics actor: a rank's batch and its alert, one unit
                r.points.append("r1", 0, 0, {"loss": (np.arange(i * 10, i * 10 + 10), np.full(10, float(i)))}, seq=i + 1)
                r.add_event("r1", kind="loss_spike", severity="warning", message=f"batch {i}", step=i * 10)
        assert r.flush(timeout=120)
    finally:
        r.close()
        proxy.close()
    s = Store(root)
    steps, vals, stored = points_of(s, "r1", "loss", 0)
    assert steps == list(range(30)) and vals == [float(i // 10) for i in range(30)] and stored == 30
    assert [e["message"] for e in s.events("r1", kind="loss_spike")] == ["batch 0", "batch 1", "batch 2"]
    s.close()


# --- a server restart in the middle of a stream -----------------------------------------------


def test_server_restart_mid_stream_loses_and_duplicates_nothing(tmp_path):
    srv = ServerProcess(tmp_path / "server-store")
    said: list[str] = []
    r = RemoteStore(srv.uri, say=said.append, give_up_s=600)
    sent: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
    rng = np.random.default_rng(0)
    try:
        new_run(r)
        r.start_attempt("r1", 0, resumed_from_step=None)
        step = 0

        def send(n_steps: int) -> None:
            nonlocal step
            for _ in range(n_steps):
                for rank in (0, 1):
                    cols = {f"m/{k}": (np.array([step]), rng.normal(size=1)) for k in range(20)}
                    r.points.append("r1", rank, 0, cols)
                    for key, (s_, v) in cols.items():
                        got = sent.setdefault((key, rank), ([], []))
                        got[0].append(int(s_[0]))
                        got[1].append(float(v[0]))
                step += 1

        send(50)
        assert r.flush(timeout=120)
        srv.kill()  # mid-stream: no clean shutdown
        send(50)  # these wait in memory
        r.add_event("r1", kind="note", severity="info", message="written while the server was down")
        deadline = time.monotonic() + 120
        while not said and time.monotonic() < deadline:  # the client noticed (one warning line)
            send(1)
            time.sleep(0.05)
        assert said and "unreachable" in said[0] and srv.uri in said[0]
        srv = ServerProcess(tmp_path / "server-store", port=srv.port)  # back, same port and store
        send(50)
        with r.transaction():
            r.points.append("r1", 0, 0, {"sender/seq": (np.array([step]), np.array([1.0]))}, seq=1)  # waits: stored
        assert r.flush(timeout=120)
        r.finish_run("r1", "completed")
        r.close()
    finally:
        srv.stop()
    assert len(said) == 2 and "reachable again" in said[1]
    s = Store(tmp_path / "server-store", create=False)
    try:
        assert len(sent) == 40
        for (key, rank), (steps, vals) in sent.items():
            assert len(steps) > 100
            got = points_of(s, "r1", key, rank)
            assert got == (steps, vals, len(steps)), (key, rank)  # every point, once, with its value
        assert s.run("r1")["status"] == "completed"
        kinds = [e["kind"] for e in s.events("r1")]
        assert "note" in kinds and "tracking_outage" in kinds
    finally:
        s.close()


# --- bad token, unreachable server -------------------------------------------------------------


def test_bad_token_is_one_line_not_a_retry_loop(tmp_path, home):
    srv = InProcess(tmp_path / "server-store", token="right-token-123")
    try:
        said: list[str] = []
        r = RemoteStore(srv.uri, token="wrong-token-456", say=said.append)
        new_run(r)
        with pytest.raises(StoreError) as e:
            r.flush(timeout=120)
        assert srv.uri in str(e.value) and "HTTP 401" in str(e.value) and "ORCHESTRATOR_TOKEN" in str(e.value)
        assert len(said) == 1 and said[0].startswith(f"tracking server {srv.uri} refused")
        with pytest.raises(StoreError):  # and every later call says so at once
            r.tag("r1", "k", "v")
        r2 = RemoteStore(srv.uri, token="right-token-123")
        new_run(r2, "r2")
        assert r2.flush(timeout=120) and r2.run("r2")["name"] == "r2"
        r2.close()
        # the CLI: one line, non-zero exit, no traceback
        env_home = tmp_path / "cli-home"
        os.environ["ORCHESTRATOR_TOKEN"] = "wrong-token-456"
        try:
            proc = run_cli("stop", "r2", "--no-wait", "--store", srv.uri, home=env_home)
        finally:
            del os.environ["ORCHESTRATOR_TOKEN"]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()
        assert len(last) == 1 and srv.uri in last[0] and "HTTP 401" in last[0], proc.stderr
    finally:
        srv.stop()


def test_unreachable_server_buffers_then_gives_up_and_saves_what_is_unsent(tmp_path, home, inproc):
    port = free_port()  # nothing listens there
    said: list[str] = []
    r = RemoteStore(f"http://127.0.0.1:{port}", say=said.append, give_up_s=1.0)
    new_run(r)
    r.points.append("r1", 1, 0, {"loss": (np.arange(100), np.linspace(0, 1, 100))})
    with pytest.raises(StoreError) as e:
        r.flush(timeout=120)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port} unreachable" in msg and "100 points" in msg and str(home / "unsent") in msg
    assert said[0].startswith(f"tracking server http://127.0.0.1:{port} unreachable") and said[-1] == msg
    with pytest.raises(StoreError):
        r.points.append("r1", 1, 0, {"loss": (np.arange(100, 101), np.zeros(1))})
    # what was saved goes to a server as it is, in name order, and is stored once
    uri, root = inproc
    files = sorted((home / "unsent").glob("*.batch"))
    assert files
    for f in files + files:  # twice: the second time is recognised
        status, _ = post(uri + BATCH_PATH, f.read_bytes())
        assert status == 200
    s = Store(root)
    assert points_of(s, "r1", "loss", 1)[2] == 100
    s.close()


def test_bad_uri_is_one_line():
    for uri, words in (("http://", "expected http://host:port"), ("http://u:pw@h:1", "put no credentials"),
                       ("http://h:1/path", "nothing after the port"), ("http://h:99999", "does not parse")):
        with pytest.raises(StoreError) as e:
            RemoteStore(uri)
        assert words in str(e.value) and "pw" not in str(e.value)
