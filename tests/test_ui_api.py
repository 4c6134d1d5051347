"""The UI's JSON API and server rules, over HTTP against a server on 127.0.0.1:0 (no browser)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from common.errors import UserError
from orchestrator.store import Store
from orchestrator.ui.server import make_server, start_in_thread

N = 300_000  # above RAW_READ_LIMIT: whole-run views come from block summaries


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("uiapi"))
    s.create_run(run_id="big", name="big", config={"optim": {"lr": 0.1}}, git_commit="c", host="h", command="c",
                 world_size=2, tags={"x": "<b>y</b>"})
    steps = np.arange(N)
    for rank in (0, 1):
        vals = np.sin(steps / 1000.0) + rank
        if rank == 1:
            vals[123_457] = 99.0
        s.points.append("big", rank, 0, {"train/loss": (steps, vals)})
    # a run restarted at step 40 after failing at 60: attempt 1 replays 40..59, and wins there
    s.create_run(run_id="restarted", name="r", config={"optim": {"lr": 0.2}}, git_commit="c", host="h", command="c",
                 world_size=1)
    s.points.append("restarted", 0, 0, {"train/loss": (np.arange(60), np.full(60, 1.0))})
    s.points.append("restarted", 0, 1, {"train/loss": (np.arange(40, 100), np.full(60, 2.0))})
    s.start_attempt("restarted", 0, resumed_from_step=None)
    s.start_attempt("restarted", 1, resumed_from_step=40)
    s.create_run(run_id="fork", name="f", config={"optim": {"lr": 0.3}}, git_commit="c", host="h", command="c",
                 world_size=1, parent="restarted", fork_step=50)
    s.points.append("fork", 0, 0, {"train/loss": (np.arange(50, 80), np.full(30, 3.0))})
    s.create_run(run_id="nan", name="n", config={}, git_commit="c", host="h", command="c", world_size=1)
    s.points.append("nan", 0, 0, {"train/loss": (np.arange(3), np.array([1.0, np.nan, 3.0]))})
    s.add_event("nan", kind="nonfinite_loss", severity="error", message="loss is nan", step=1, data={"value": np.nan})
    return s


@pytest.fixture(scope="module")
def base(store):
    server, _ = start_in_thread(store=Store(store.root), port=0)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def get(url: str, headers: dict | None = None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:
        return r.status, dict(r.headers), r.read()


def api(base: str, path: str):
    return json.loads(get(f"{base}/api/{path}")[2])


def status_of(url: str, headers: dict | None = None) -> int:
    try:
        return get(url, headers)[0]
    except urllib.error.HTTPError as e:
        return e.code


def test_runs_rows(base):
    rows = {r["id"]: r for r in api(base, "runs")["runs"]}
    assert set(rows) == {"big", "restarted", "fork", "nan"}
    assert rows["fork"]["parent"] == "restarted" and rows["fork"]["fork_step"] == 50
    assert rows["restarted"]["last_loss"] == 2.0 and rows["restarted"]["restarts"] == 1
    assert rows["big"]["tags"] == {"x": "<b>y</b>"}  # data, never markup: the page sets textContent


def test_whole_run_buckets_match_the_store_and_keep_the_spike(base, store):
    m = api(base, "run/big/metric?key=train/loss&buckets=500")
    assert m["points"] == store.buckets("big", "train/loss", 500)
    assert m["ranks"] == [0, 1] and m["full"] is False and m["span"] == [0, N - 1]
    top = max(m["points"], key=lambda p: p["max"])
    assert top["max"] == 99.0 and top["step"] <= 123_457 <= top["last_step"]


def test_zoomed_range_is_exact(base, store):
    lo, hi = 100_000, 250_000  # wide: summaries inside, raw points at the edges
    m = api(base, f"run/big/metric?key=train/loss&buckets=300&lo={lo}&hi={hi}")
    assert m["lo"] == lo and m["hi"] == hi
    assert sum(p["count"] for p in m["points"]) == 2 * (hi - lo + 1)  # every point once, none twice
    assert m["points"][0]["step"] == lo and m["points"][-1]["last_step"] == hi
    assert max(p["max"] for p in m["points"]) == 99.0
    narrow = api(base, "run/big/metric?key=train/loss&buckets=1000&lo=123400&hi=123500")
    assert narrow["full"] is True and len(narrow["points"]) == 101
    spike = [p for p in narrow["points"] if p["max"] == 99.0]
    assert [p["step"] for p in spike] == [123_457]
    one = api(base, "run/big/metric?key=train/loss&buckets=1000&rank=0&lo=123400&hi=123500")
    ref = {p["step"]: p["value"] for p in store.series("big", "train/loss", rank=0) if 123_400 <= p["step"] <= 123_500}
    assert {p["step"]: p["value"] for p in one["points"]} == ref


def test_restarts_and_forks(base, store):
    m = api(base, "run/restarted/metric?key=train/loss&buckets=1000")
    assert [(p["step"], p["value"]) for p in m["points"]] == [(p["step"], p["value"])
                                                              for p in store.series("restarted", "train/loss")]
    f = api(base, "run/fork/metric?key=train/loss&buckets=1000")
    assert [p["step"] for p in f["inherited"]] == list(range(50))  # the parent's steps below the fork step
    assert {p["value"] for p in f["inherited"][40:]} == {2.0}  # ... as the parent's latest attempt logged them
    assert [p["step"] for p in f["points"]] == list(range(50, 80))
    tree = api(base, "run/fork")["lineage"]
    assert tree["id"] == "restarted" and tree["children"][0]["id"] == "fork"
    assert tree["children"][0]["fork_step"] == 50 and tree["children"][0]["current"] is True


def test_nan_is_sent_as_null(base):
    m = api(base, "run/nan/metric?key=train/loss&buckets=10")
    assert [p["value"] for p in m["points"]] == [1.0, None, 3.0]  # strict JSON; the chart leaves a gap
    assert api(base, "run/nan")["events"][0]["data"] == {"value": None}


def test_compare_and_checkpoints(base):
    c = api(base, "compare?runs=big,fork")
    assert [row["key"] for row in c["config"] if row["differs"]] == ["optim.lr"]
    assert c["metric_keys"] == ["train/loss"]
    ck = api(base, "run/fork/checkpoints")
    assert "available" in ck


def test_errors_and_headers(base):
    assert status_of(f"{base}/api/run/nope") == 404
    assert status_of(f"{base}/api/run/big/metric?key=train/loss&buckets=0") == 400
    assert status_of(f"{base}/api/run/big/metric?key=train/loss&lo=5&hi=1") == 400
    assert status_of(f"{base}/static/../server.py") == 404
    code, headers, body = get(f"{base}/")
    assert code == 200 and b"app.js" in body
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert status_of(f"{base}/api/runs", {"Host": "evil.example:80"}) == 403  # DNS rebinding


def test_token_is_required_on_every_request(store):
    with pytest.raises(UserError, match="--token"):
        make_server(host="0.0.0.0", port=0, store=store)
    with pytest.raises(UserError, match="--token must"):
        make_server(host="127.0.0.1", port=0, token="a;b", store=store)
    server, _ = start_in_thread(host="127.0.0.1", port=0, token="s3cret-token", store=Store(store.root))
    b = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert status_of(f"{b}/api/runs") == 401
        assert status_of(f"{b}/") == 401
        assert status_of(f"{b}/api/runs", {"X-Token": "wrong"}) == 401
        assert status_of(f"{b}/api/runs", {"X-Token": "s3cret-token"}) == 200
        code, headers, _ = get(f"{b}/?token=s3cret-token")
        assert code == 200 and "orchestrator_token=s3cret-token" in headers["Set-Cookie"]
        assert status_of(f"{b}/api/runs", {"Cookie": "orchestrator_token=s3cret-token"}) == 200
    finally:
        server.shutdown()
        server.server_close()


def test_cli_refuses_open_interface_without_token(home, capsys):
    from orchestrator.cli import main

    assert main(["ui", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--token" in err and len(err.strip().splitlines()) == 1


def test_cli_serves_until_interrupted(home):
    import os
    import re
    import signal
    import subprocess
    import sys

    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the server prints its URL first
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert json.loads(get(url + "api/runs")[2])["runs"] == []
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
