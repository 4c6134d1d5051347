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
from tests.conftest import ORCH, REPO, cli_json, free_port, run_cli, tiny_config

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

    def __init__(self, store_dir: Path, *, token: str | None = None, store=None):
        self.store_dir = store_dir
        self.store = store if store is not None else Store(store_dir)
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
                      checkpoint={"uri": str(tmp_path / "ckpt"), "every_steps": 6}, tracking={"uri": server.uri})
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
        # the checkpoint coordinator's records came through the ingest API (not only manifests at the destination)
        recorded = s.db.execute("SELECT step, status, bytes FROM checkpoints WHERE run_id = ? ORDER BY step",
                                (run["id"],)).fetchall()
        assert [(step, status) for step, status, _ in recorded] == [(6, "committed"), (12, "committed")], recorded
        assert all(n and n > 0 for _, _, n in recorded)
    finally:
        s.close()
    report = cli_json("checkpoints", run["id"], *store, home=home)
    assert [(c["step"], c["status"], c["present"]) for c in report["checkpoints"]] == [
        (6, "committed", True), (12, "committed", True)], report


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

    server = InProcess(tmp_path, store=open_store(store_uri))
    uri = server.uri
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
        server.stop()


def test_checkpoint_records_go_through_the_server_once(tmp_path, store_uri):
    """What the checkpoint coordinator records (open_checkpoint_records on an http URI) lands in the
    server's checkpoints table, on either backend; a batch sent again changes nothing."""
    from orchestrator.store import open_checkpoint_records, open_store

    server = InProcess(tmp_path, store=open_store(store_uri))
    uri = server.uri
    try:
        r = RemoteStore(uri, private=True)
        new_run(r)
        r.close()
        records = open_checkpoint_records(uri)
        records.add(run_id="r1", step=5, status="committed", bytes=1234, blocked_s=0.5, upload_s=1.5,
                    uri="file:///c/step_00000005")
        records.add(run_id="r1", step=10, status="failed", error="disk full")
        records.mark_corrupt(run_id="r1", step=5, uri="file:///c/step_00000005", error="sha256 mismatch")
        with pytest.raises(ValueError, match="status"):
            records.add(run_id="r1", step=15, status="exploded")
        records.close()  # delivers what is queued
        op = {"op": "checkpoint", "run_id": "r1", "step": 10, "status": "failed", "bytes": None, "blocked_s": None,
              "upload_s": None, "uri": None, "error": "disk full"}
        body = encode("client-ckpt", 1, [[op]], [])
        assert post(uri + BATCH_PATH, body) == (200, {"applied": True, "points": 0})
        assert post(uri + BATCH_PATH, body) == (200, {"applied": False, "points": 0})
        status, answer = post(uri + BATCH_PATH, encode("client-ckpt", 2, [[{**op, "status": "maybe"}]], []))
        assert status == 400 and "op checkpoint: status 'maybe'" in answer["error"]
    finally:
        server.stop()
    check = open_store(store_uri)
    rows = check.checkpoint_records()
    try:
        got = [(c["step"], c["status"], c["bytes"], c["error"]) for c in rows.list("r1")]
    finally:
        rows.close()
        check.close()
    assert got == [(5, "corrupt", 1234, "sha256 mismatch"), (10, "failed", None, "disk full")]


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


# --- moving a server's store: its bookkeeping goes along ----------------------------------------


def test_a_store_copied_to_postgresql_still_takes_each_batch_once(tmp_path, pg_uri, home):
    """Server on SQLite; stop it, `store copy` to PostgreSQL, serve that: the batch whose answer was
    lost is acknowledged, not applied again, and an event is found again by its reference."""
    from orchestrator.store import open_store

    def op_create(run_id: str) -> dict:
        return {"op": "create_run", "run_id": run_id, "name": run_id, "config": {}, "git_commit": None, "host": "h",
                "command": "c", "world_size": 1, "parent": None, "fork_step": None, "meta": None, "tags": None}

    event = {"op": "add_event", "ref": "client-move:1", "run_id": "r1", "kind": "stall", "severity": "error",
             "message": "rank 0 stalled", "step": 3, "rank": 0, "data": None}
    logs = {"op": "logs", "run_id": "r1", "attempt": 0, "rank": 0, "lines": [[1.0, "stdout", "hello"]]}
    points, arrays, _ = points_op("r1", 0, 0, None, {"loss": (np.arange(4), np.array([4.0, 3.0, 2.0, 1.0]))})
    first = encode("client-move", 1, [[op_create("r1"), op_create("r2")]], [])
    second = encode("client-move", 2, [[event, logs, points]], arrays)  # its answer is lost in the move

    old = InProcess(tmp_path / "old")
    try:
        assert post(old.uri + BATCH_PATH, first)[0] == 200
        assert post(old.uri + BATCH_PATH, second) == (200, {"applied": True, "points": 4})
    finally:
        old.stop()
    copied = run_cli("store", "copy", str(tmp_path / "old"), pg_uri, "--run", "r1", home=home, check=True)
    assert "run r1: copied 4 points in 1 series, 1 events, 1 log lines" in copied.stdout

    server = InProcess(tmp_path, store=open_store(pg_uri))
    uri = server.uri
    try:
        assert post(uri + BATCH_PATH, second) == (200, {"applied": False, "points": 0})  # sent again: once
        update = {"op": "update_event_data", "event": "client-move:1", "data": {"node": "n1"}}
        assert post(uri + BATCH_PATH, encode("client-move", 3, [[update]], []))[0] == 200
    finally:
        server.stop()
    check = open_store(pg_uri)
    try:
        (stall,) = check.events("r1")
        assert stall["message"] == "rank 0 stalled" and stall["data"] == {"node": "n1"}
        assert [r["line"] for r in check.logs.read("r1")] == ["hello"]
        assert points_of(check, "r1", "loss", 0) == ([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0], 4)
        assert [r["id"] for r in check.runs()] == ["r1"]  # r2 stayed behind (--run r1)
    finally:
        check.close()


# --- read commands against a server: the same output as against its database ------------------

TOKEN = "read-token-1234"


def _a_finished_store(where: str, ckpt_root: Path) -> None:
    """Two runs (one forked) with what every read command shows, made with the Store API."""
    from orchestrator.logged_points import PointWriter
    from orchestrator.store import open_store

    s = open_store(where)
    try:
        cfg = {"run": {"name": "base"}, "optim": {"lr": 0.01}, "checkpoint": {"uri": str(ckpt_root / "base")},
               "$odd": {"$f": "a user's key that looks like the wire's"}}
        s.create_run(run_id="base", name="base", config=cfg, git_commit="abc123", host="h", command="orchestrator launch",
                     world_size=2, tags={"team": "nlp"})
        s.add_note("base", "first try")
        s.start_attempt("base", 0, resumed_from_step=None)
        steps = np.arange(150)
        for rank in (0, 1):
            loss = np.linspace(3.0, 1.0, 150) + rank * 0.01
            loss[50] = np.nan if rank == 0 else np.inf  # a diverged step: must travel as itself
            loss[90] = 40.0  # a one-step spike
            s.points.append("base", rank, 0, {"train/loss": (steps, loss),
                                              "train/tokens_per_s": (steps, np.full(150, 1000.0 + rank))})
        s.points.append("base", 0, 0, {"eval/loss": (np.array([49, 99, 149]), np.array([2.5, 2.0, 1.5]))})
        s.end_attempt("base", 0, "failed", cause="stall", rank=1, message="rank 1 stalled", failed_step=149)
        s.add_event("base", kind="stall", severity="error", message="rank 1 stalled in all_reduce", step=149, rank=1,
                    data={"verdict": "rank 1 hung", "culprits": [1], "culprit_nodes": ["n1"], "stalled_s": 31.5,
                          "ranks": {str(r): {"node": f"n{r}", "step": 149, "phase": phase, "coll_entered": 300 - r,
                                             "coll_completed": 299 - r, "age_s": 0.5 + 30 * r}
                                    for r, phase in ((0, "collective"), (1, "forward"))}})
        s.start_attempt("base", 1, resumed_from_step=100)  # replays 100..149: the later attempt wins
        for rank in (0, 1):
            s.points.append("base", rank, 1, {"train/loss": (np.arange(100, 200), np.linspace(1.2, 0.8, 100))})
        s.end_attempt("base", 1, "completed")
        PointWriter(s).write("base", [("mlflow/acc", i, 0.5 + i / 100, 1_700_000_000.0 + i) for i in range(70)])
        s.logs.add("base", 0, 0, [(1.0, "stdout", "hello from rank 0"), (2.0, "stderr", "a warning \x1b[31mred")])
        s.logs.add("base", 1, 1, [(3.0, "stdout", "rank 1 after the restart")])
        s.finish_run("base", "completed", summary={"last_loss": 0.8, "restarts": 1})
        records = s.checkpoint_records()
        records.add(run_id="base", step=100, status="committed", bytes=123_456, blocked_s=0.1, upload_s=1.5,
                    uri=str(ckpt_root / "base" / "step_00000100"))
        records.add(run_id="base", step=150, status="failed", error="upload timed out")
        records.close()
        s.create_run(run_id="fork1", name="fork1", config={**cfg, "optim": {"lr": 0.02}}, git_commit="abc123",
                     host="h", command="orchestrator fork", world_size=2, parent="base", fork_step=120)
        for rank in (0, 1):
            s.points.append("fork1", rank, 0, {"train/loss": (np.arange(120, 180), np.linspace(0.9, 0.7, 60))})
        s.finish_run("fork1", "completed", summary={"last_loss": 0.7})
    finally:
        s.close()


class ReadServer(InProcess):
    """A server (in this process, with a token) on a store holding finished runs; `where` names
    that store for the direct reads."""

    def __init__(self, where: str, ckpt_root: Path):
        from orchestrator.store import open_store

        _a_finished_store(where, ckpt_root)
        self.where = where
        super().__init__(Path(where), token=TOKEN, store=open_store(where))


@pytest.fixture
def read_server(tmp_path):
    srv = ReadServer(str(tmp_path / "server-store"), tmp_path / "ckpts")
    yield srv
    srv.stop()


@pytest.fixture
def read_server_each(tmp_path, store_uri):
    """The same on SQLite, then on PostgreSQL."""
    srv = ReadServer(store_uri, tmp_path / "ckpts")
    yield srv
    srv.stop()


def _cli(capsys, monkeypatch, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """The CLI in this process (a subprocess per command would cost seconds each)."""
    from orchestrator.cli import main

    if token is None:
        monkeypatch.delenv("ORCHESTRATOR_TOKEN", raising=False)
    else:
        monkeypatch.setenv("ORCHESTRATOR_TOKEN", token)
    capsys.readouterr()
    code = main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


READ_COMMANDS = [
    ["runs"], ["runs", "--json"], ["runs", "--tag", "team=nlp", "--where", "optim.lr=0.02", "--json"],
    ["show", "base"], ["show", "base", "--json"], ["show", "fork1"],
    ["metrics", "base"], ["metrics", "base", "--json"], ["metrics", "base", "--key", "train/loss"],
    ["metrics", "base", "--key", "train/loss", "--json"], ["metrics", "base", "--key", "train/loss", "--rank", "1"],
    ["metrics", "base", "--key", "train/loss", "--buckets", "7", "--json"],
    ["metrics", "fork1", "--key", "train/loss", "--buckets", "5"], ["metrics", "fork1", "--key", "train/loss", "--json"],
    ["compare", "base", "fork1"], ["compare", "base", "fork1", "--json"],
    ["checkpoints", "base"], ["checkpoints", "base", "--json"],
    ["diagnose", "base"], ["diagnose", "base", "--json"],
    ["logs", "base"], ["logs", "base", "--rank", "1", "--json"], ["logs", "base", "--attempt", "0"],
]


def test_every_read_command_says_the_same_over_http_as_from_the_database(read_server_each, tmp_path, capsys,
                                                                         monkeypatch):
    read_server = read_server_each
    monkeypatch.setenv("ORCHESTRATOR_STORE", "")  # main() sets it from --store: put back after
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "client-home"))
    direct, remote = ["--store", read_server.where], ["--store", read_server.uri]
    for args in READ_COMMANDS:
        code, want, err = _cli(capsys, monkeypatch, *args, *direct)
        assert code == 0 and want.strip(), (args, err)
        code, got, err = _cli(capsys, monkeypatch, *args, *remote, token=TOKEN)
        assert code == 0 and err == "", (args, err)
        assert got == want, args
    # spot checks that the outputs compared hold what they should
    _, shown, _ = _cli(capsys, monkeypatch, "metrics", "base", "--key", "train/loss", "--rank", "0", "--json",
                       *remote, token=TOKEN)
    points = {p["step"]: p["value"] for p in json.loads(shown)["points"]}
    assert len(points) == 200 and points[50] is None and points[90] == 40.0  # NaN (null in JSON), the spike
    _, shown, _ = _cli(capsys, monkeypatch, "show", "base", "--json", *remote, token=TOKEN)
    run = json.loads(shown)
    assert run["config"]["$odd"] == {"$f": "a user's key that looks like the wire's"} and len(run["attempts"]) == 2
    # export: the same file either way
    for fmt in ("csv", "parquet"):
        a, b = tmp_path / f"direct.{fmt}", tmp_path / f"remote.{fmt}"
        assert _cli(capsys, monkeypatch, "export", "base", "--format", fmt, "--out", str(a), *direct)[0] == 0
        assert _cli(capsys, monkeypatch, "export", "base", "--format", fmt, "--out", str(b), *remote, token=TOKEN)[0] == 0
        if fmt == "csv":
            text = a.read_text()
            assert text.count("\n") > 600 and "mlflow/acc" in text and text == b.read_text()
        else:
            import pyarrow.parquet as pq

            assert pq.read_table(a).num_rows > 600 and a.read_bytes() == b.read_bytes()  # NaN != NaN: bytes


def test_read_commands_over_http_fail_in_one_line(read_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_STORE", "")
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "client-home"))
    cases = [
        (["show", "nope", "--store", read_server.uri], TOKEN, "nope"),  # unknown run
        (["runs", "--store", read_server.uri], "wrong-token-999", "HTTP 401"),
        (["metrics", "base", "--key", "train/loss", "--store", read_server.uri], None, "HTTP 401"),
        (["runs", "--store", f"http://127.0.0.1:{free_port()}"], TOKEN, "unreachable"),  # nothing listens
        (["import", "tensorboard", str(tmp_path), "--store", read_server.uri], TOKEN, "import writes points directly"),
    ]
    for args, token, words in cases:
        code, out, err = _cli(capsys, monkeypatch, *args, token=token)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, (args, err)
        assert TOKEN not in err


def test_a_read_cannot_write(read_server):
    """Only whitelisted reads, answered from a read-only view: write methods are refused by name."""
    uri, headers = read_server.uri + "/ingest/v1/read", {"X-Token": TOKEN}
    for method, args in (("finish_run", {"run_id": "base", "status": "failed"}), ("points.append", {}),
                         ("logs.add", {}), ("request_stop", {"run_id": "base"}), ("db.execute", {})):
        status, answer = post(uri, json.dumps({"method": method, "args": args}).encode(), "application/json", headers)
        assert status == 400 and "expected" in answer["error"], (method, answer)
    status, answer = post(uri, json.dumps({"method": "logs.read", "args": {"run_id": "base", "rank": None,
                          "attempt": None, "after": 0, "limit": 10**9, "tail": None}}).encode(), "application/json",
                          headers)
    assert status == 400 and "limit" in answer["error"]
    s = Store(Path(read_server.where), create=False)
    try:
        assert s.run("base")["status"] == "completed" and not s.stop_requested("base")
    finally:
        s.close()


def test_the_runs_table_reads_its_series_in_one_query(tmp_path, store_uri):
    """The UI's runs table (also a server's first /api/runs on PostgreSQL) reads every short series
    at once (read_many), with the same result as one read per series."""
    from orchestrator.store import open_store
    from orchestrator.ui.api import TABLE_KEYS, Api
    from orchestrator.ui.ranges import quick_stats

    s = open_store(store_uri)
    try:
        rng = np.random.default_rng(3)
        for i in range(6):
            new_run(s, f"r{i}")
            for rank in (0, 1):
                n = 9000 if i == 0 else 40 + i  # r0: a sealed chunk and a tail
                s.points.append(f"r{i}", rank, 0, {"train/loss": (np.arange(n), rng.normal(size=n)),
                                                   "train/tokens_per_s": (np.arange(n), rng.uniform(900, 1100, n))})
            s.points.append(f"r{i}", 0, 0, {"train/loss": (np.array([5, 6]), np.array([-7.0, np.nan]))})  # again
        s.points.append("r1", 0, 1, {"train/loss": (np.arange(20, 60), np.zeros(40))})  # a restart's replay
        sids = [sid for i in range(6) for key in TABLE_KEYS for sid, *_ in s.points.find(f"r{i}", key)]
        many = s.points.read_many([*sids, sids[0], 10**9])
        assert len(sids) >= 24 and len(many[10**9].steps) == 0
        for sid in sids:
            one = s.points.read(sid)
            assert len(one.steps) and np.array_equal(many[sid].steps, one.steps)
            assert np.array_equal(many[sid].values, one.values, equal_nan=True)
        api = Api(s)
        reader = api.open()
        try:
            table = {r["id"]: r for r in api.runs(reader)["runs"]}
            for i in range(6):
                want = quick_stats(reader, f"r{i}", "train/loss", reader.points.find(f"r{i}", "train/loss"))
                assert want and table[f"r{i}"]["last_loss"] == want["last"] and table[f"r{i}"]["best_loss"] == want["best"]
        finally:
            reader.close()
    finally:
        s.close()
