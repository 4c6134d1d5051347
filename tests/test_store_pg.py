"""The PostgreSQL backend against a real server (tests/pg_server.py): schema versions and
`store migrate`, bad store URIs, `store copy` both ways point for point, the read commands with
--store, and a run that writes to PostgreSQL through tracking.uri.

The backend-neutral behaviour (runs, series, buckets, forks, views) runs on both backends in
tests/test_store.py, test_run_views.py and test_store_integrity.py.
"""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest

from common.errors import StoreError
from orchestrator.store import open_store
from orchestrator.store_schema import SCHEMA_VERSION, TABLES
from orchestrator.store_sql import PgConnection, existing_tables
from tests.conftest import cli_json, run_cli, tiny_config


def one_line(proc) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# --- schema versions ------------------------------------------------------------------------


def test_migrate_creates_then_has_nothing_to_do(pg_uri, home):
    proc = run_cli("store", "migrate", "--store", pg_uri, home=home, check=True)
    assert f"created at schema version {SCHEMA_VERSION}" in proc.stdout
    proc = run_cli("store", "migrate", "--store", pg_uri, home=home, check=True)
    assert "nothing to do" in proc.stdout
    assert cli_json("runs", "--store", pg_uri, home=home) == []
    assert not home.exists()  # nothing was made in the local store


def test_a_newer_schema_is_refused_in_one_line(pg_uri, home):
    open_store(pg_uri).close()
    db = PgConnection(pg_uri)
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.close()
    line = one_line(run_cli("runs", "--store", pg_uri, home=home))
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this orchestrator's ({SCHEMA_VERSION})" in line
    line = one_line(run_cli("store", "migrate", "--store", pg_uri, home=home))
    assert "newer than this orchestrator's" in line


def test_a_newer_sqlite_schema_is_refused_too(tmp_path, home):
    store = open_store(str(tmp_path / "s"))
    store.db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    store.close()
    line = one_line(run_cli("runs", "--store", str(tmp_path / "s"), home=home))
    assert "newer than this orchestrator's" in line


def test_an_older_schema_says_to_migrate_and_migrate_upgrades_it(pg_uri, home):
    store = open_store(pg_uri)
    store.create_run(run_id="r1", name="old", config={}, git_commit=None, host="h", command="c", world_size=1)
    store.close()
    db = PgConnection(pg_uri)  # what an older release left: no stop_requested column, no version recorded
    db.execute("ALTER TABLE runs DROP COLUMN stop_requested")
    db.execute("DELETE FROM schema_version")
    db.close()
    line = one_line(run_cli("runs", "--store", pg_uri, home=home))
    assert "older schema (version 0, missing stop_requested" in line and "orchestrator store migrate --store" in line
    proc = run_cli("store", "migrate", "--store", pg_uri, home=home, check=True)
    assert f"schema version 0 -> {SCHEMA_VERSION}" in proc.stdout
    assert [r["name"] for r in cli_json("runs", "--store", pg_uri, home=home)] == ["old"]  # the run survived


def test_version_1_gains_the_servers_bookkeeping_tables(pg_uri, tmp_path, home):
    """Version 2 brought ingest_clients and ingest_events under the schema: a version 1 store (as the
    last release left it: the server made them itself, if it ran) is told to migrate, and migrate
    adds them; a SQLite store adds them when opened."""
    assert SCHEMA_VERSION == 2
    for uri in (pg_uri, str(tmp_path / "s")):
        store = open_store(uri)
        store.create_run(run_id="r1", name="old", config={}, git_commit=None, host="h", command="c", world_size=1)
        store.db.execute("DROP TABLE ingest_clients")
        store.db.execute("DROP TABLE ingest_events")
        store.db.execute("UPDATE schema_version SET version = 1")
        store.close()
    line = one_line(run_cli("runs", "--store", pg_uri, home=home))
    assert "older schema (version 1, missing ingest_clients, ingest_events" in line and "store migrate" in line
    proc = run_cli("store", "migrate", "--store", pg_uri, home=home, check=True)
    assert "schema version 1 -> 2" in proc.stdout
    for uri in (pg_uri, str(tmp_path / "s")):
        store = open_store(uri)
        try:
            assert {"ingest_clients", "ingest_events"} <= existing_tables(store.db)
            assert store.db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 2
            assert [r["name"] for r in store.runs()] == ["old"]
        finally:
            store.close()


def tables_in(uri: str) -> int:
    db = PgConnection(uri)
    try:
        return db.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
                          ).fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("made", [False, True], ids=["fresh-database", "migrated-store"])
def test_read_commands_on_an_empty_store_list_nothing_and_make_nothing(made, pg_uri, home, monkeypatch, capsys):
    """A fresh database (nobody has written to it) reads as a store without runs, as does a
    migrated one: `runs` lists nothing, a command on a run says there is no such run."""
    from orchestrator import cli

    if made:
        open_store(pg_uri).close()
    before = tables_in(pg_uri)
    assert before == (len(TABLES) if made else 0)
    monkeypatch.setenv("ORCHESTRATOR_STORE", pg_uri)  # restored after (main sets it from --store)
    assert cli.main(["runs", "--json", "--store", pg_uri]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["runs", "--store", pg_uri]) == 0
    assert "no runs yet" in capsys.readouterr().out
    for argv in (["show", "r1"], ["metrics", "r1", "--key", "train/loss"], ["compare", "r1", "r2"],
                 ["checkpoints", "r1"], ["diagnose", "r1"], ["logs", "r1"], ["export", "r1", "--format", "csv"]):
        assert cli.main([*argv, "--store", pg_uri]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
        assert "no run 'r1' in postgresql://" in err and pg_uri.rsplit("/", 1)[1] in err and "has no runs yet" in err, err
    assert tables_in(pg_uri) == before  # reading made nothing in the shared database
    assert not home.exists()  # nor in the local store


def test_copy_from_an_empty_database_copies_nothing_and_makes_nothing(tmp_path, pg_uri, home):
    proc = run_cli("store", "copy", pg_uri, str(tmp_path / "dst"), home=home, check=True)
    assert "copied 0 run(s)" in proc.stdout
    assert tables_in(pg_uri) == 0


def test_a_dropped_connection_fails_one_write_then_the_retried_batch_lands_once(pg_uri):
    store = open_store(pg_uri)
    store.create_run(run_id="r1", name="n", config={}, git_commit=None, host="h", command="c", world_size=1)
    batch = {"train/loss": (np.arange(100), np.linspace(1.0, 0.0, 100))}
    assert store.points.append("r1", 0, 0, batch, seq=0) == 100
    admin = PgConnection(pg_uri)  # the server drops the store's connection (as a restart would)
    admin.execute("SELECT pg_terminate_backend(?)", (store.db.conn.info.backend_pid,))
    admin.close()
    nxt = {"train/loss": (np.arange(100, 200), np.linspace(0.0, -1.0, 100))}
    with pytest.raises(StoreError, match="lost the tracking store"):
        store.points.append("r1", 0, 0, nxt, seq=1)
    assert store.points.append("r1", 0, 0, nxt, seq=1) == 100  # the sender's retry: a new connection
    assert store.points.append("r1", 0, 0, nxt, seq=1) == 0  # and never twice
    assert [p["step"] for p in store.series("r1", "train/loss", rank=0)] == list(range(200))
    store.close()


# --- bad store URIs --------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("postgresql://u@127.0.0.1:5x/db", "port that is not a number"),
    ("postgresql://u@127.0.0.1:5432", "names no database"),
    ("ftp://somewhere/x", "unknown scheme 'ftp'"),
    ("postgresql://u:hunter2@[::1/db", "does not parse"),
])
def test_a_store_uri_that_does_not_parse_is_one_line(uri, expected, home):
    line = one_line(run_cli("runs", "--store", uri, home=home))
    assert expected in line and "hunter2" not in line


def test_a_server_that_cannot_be_reached_is_one_line(home, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on (bound, not listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        uri = f"postgresql://someone:hunter2@127.0.0.1:{port}/db"
        line = one_line(run_cli("runs", "--store", uri, home=home))
        assert "cannot reach the tracking store postgresql://" in line and f"127.0.0.1:{port}/db" in line
        assert "hunter2" not in line
        monkeypatch.setenv("ORCHESTRATOR_STORE", uri)  # the same through the environment
        assert "cannot reach the tracking store" in one_line(run_cli("metrics", "r1", home=home))


def test_tracking_uri_that_does_not_parse_is_a_config_error(tmp_path, tiny_data, home):
    cfg = tiny_config(tmp_path, tiny_data)
    line = one_line(run_cli("validate", str(cfg), "tracking.uri=postgresql://u@h:1", home=home))
    assert line.startswith("orchestrator: error: tracking.uri: store URI") and "names no database" in line


# --- store copy ------------------------------------------------------------------------------


def fill(store, run_id: str) -> None:
    """A run with everything a store keeps: points sealed into chunks and in the tail, a replay
    after a restart, NaN, several ranks, events, notes, tags, attempts, logs, checkpoints."""
    store.create_run(run_id=run_id, name="big", config={"optim": {"lr": 0.1}}, git_commit="abc", host="h",
                     command="orchestrator launch x.yaml", world_size=3, meta={"seed": 1}, tags={"team": "nlp"})
    rng = np.random.default_rng(0)
    for rank in range(3):
        steps = np.arange(20_000)
        vals = rng.standard_normal(20_000)
        vals[777] = math.nan
        for lo in range(0, 20_000, 5_000):  # several batches: sealed chunks, summaries, a tail
            store.points.append(run_id, rank, 0, {"train/loss": (steps[lo:lo + 5_000], vals[lo:lo + 5_000]),
                                                  "train/lr": (steps[lo:lo + 5_000], np.full(5_000, 0.1))},
                                seq=lo // 5_000)
        store.points.append(run_id, rank, 1, {"train/loss": (np.arange(19_000, 21_000), rng.standard_normal(2_000))})
    for attempt in (0, 1):
        store.start_attempt(run_id, attempt, resumed_from_step=None if attempt == 0 else 19_000)
    store.end_attempt(run_id, 0, "failed", cause="rank_died", rank=2, failed_step=19_500, steps_lost=500)
    store.end_attempt(run_id, 1, "completed")
    eid = store.add_event(run_id, kind="stall", severity="error", message="rank 2 stalled", step=19_500, rank=2)
    store.update_event_data(eid, {"node": "n2"})
    store.add_event(run_id, kind="straggler", severity="warning", message="slow", step=100, rank=1)
    store.add_note(run_id, "first note")
    store.add_note(run_id, "second note")
    store.logs.add(run_id, 0, 0, [(1.0 + i, "stdout", f"line {i}") for i in range(50)])
    store.logs.add(run_id, 1, 2, [(99.0, "stderr", "boom")])
    records = store.checkpoint_records()
    records.add(run_id=run_id, step=10_000, status="committed", bytes=123, uri="file:///c/step_10000")
    records.add(run_id=run_id, step=19_000, status="failed", error="disk full")
    records.close()
    store.finish_run(run_id, "completed", summary={"last_loss": 1.0})


def everything(store, run_id: str) -> dict:
    """What the store says about a run, through its own queries, every point included."""
    run = store.run(run_id)
    records = store.checkpoint_records()
    try:
        checkpoints = records.list(run_id)
    finally:
        records.close()
    points = {}
    for key in store.metric_keys(run_id):
        for rank in store.ranks(run_id, key):
            p = store.rank_points(run_id, key, rank)
            points[(key, rank)] = (p.steps.tolist(), p.values.tobytes())
        for sid, rank, attempt, n in store.points.find(run_id, key):  # every stored point, replays too
            raw = store.points.read(sid)
            points[(key, rank, attempt)] = (n, raw.steps.tolist(), raw.values.tobytes())
    return {
        "run": {k: v for k, v in run.items() if k != "status"} | {"stored_status": run["status"]},
        "events": store.events(run_id), "notes": store.notes(run_id), "attempts": store.attempts(run_id),
        "logs": [(r["attempt"], r["rank"], r["stream"], r["time"], r["line"]) for r in store.logs.read(run_id)],
        "checkpoints": checkpoints, "points": points,
        "buckets": store.buckets(run_id, "train/loss", 50), "series": store.series(run_id, "train/loss")[-100:],
    }


def test_copy_moves_a_run_point_for_point_to_postgresql_and_back(tmp_path, pg_uri, home):
    src = open_store(str(tmp_path / "a"))
    fill(src, "r1")
    want = everything(src, "r1")
    src.close()
    assert len(want["points"]) == 15 and want["events"] and want["logs"] and want["checkpoints"]

    proc = run_cli("store", "copy", str(tmp_path / "a"), pg_uri, home=home, check=True)
    assert "run r1: copied 126000 points in 9 series, 2 events, 51 log lines" in proc.stdout
    pg = open_store(pg_uri)
    assert everything(pg, "r1") == want
    pg.close()

    proc = run_cli("store", "copy", pg_uri, str(tmp_path / "b" / "back.db"), "--run", "big", home=home, check=True)
    assert "copied 1 run(s)" in proc.stdout
    back = open_store(str(tmp_path / "b" / "back.db"))
    assert everything(back, "r1") == want
    back.close()

    again = run_cli("store", "copy", str(tmp_path / "a"), pg_uri, home=home, check=True)
    assert "already in" in again.stdout  # never a second copy of the same run


def test_copy_of_an_unknown_run_or_onto_itself_is_one_line(tmp_path, pg_uri, home):
    open_store(str(tmp_path / "a")).close()
    assert "no run 'nope'" in one_line(run_cli("store", "copy", str(tmp_path / "a"), pg_uri, "--run", "nope", home=home))
    assert "both the source and the destination" in one_line(run_cli("store", "copy", pg_uri, pg_uri, home=home))


# --- the read commands with --store ----------------------------------------------------------


def test_read_commands_take_store_and_the_environment(pg_uri, home, monkeypatch):
    store = open_store(pg_uri)
    fill(store, "r1")
    store.close()
    assert [r["id"] for r in cli_json("runs", "--store", pg_uri, home=home)] == ["r1"]
    assert cli_json("show", "r1", "--store", pg_uri, home=home)["tags"] == {"team": "nlp"}
    pts = cli_json("metrics", "r1", "--key", "train/loss", "--rank", "0", "--store", pg_uri, home=home)["points"]
    assert len(pts) == 21_000 and pts[777]["value"] is None  # NaN: null in strict JSON
    logs = cli_json("logs", "r1", "--rank", "2", "--store", pg_uri, home=home)
    assert json.dumps(logs).count("boom") == 1
    ckpts = cli_json("checkpoints", "r1", "--store", pg_uri, home=home)["checkpoints"]
    assert [(c["step"], c["status"]) for c in ckpts] == [(10_000, "committed"), (19_000, "failed")]
    assert cli_json("diagnose", "r1", "--store", pg_uri, home=home) is not None
    monkeypatch.setenv("ORCHESTRATOR_STORE", pg_uri)
    assert [r["id"] for r in cli_json("runs", home=home)] == ["r1"]
    assert not home.exists()  # the local store was never touched


# --- a run writing to PostgreSQL ----------------------------------------------------------------


@pytest.mark.ray
def test_a_run_with_tracking_uri_writes_to_postgresql(tmp_path, pg_uri, home, tiny_data, ray_address):
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 10, "eval_every": 5, "eval_batches": 1},
                      checkpoint={"uri": str(tmp_path / "ckpt"), "every_steps": 5}, tracking={"uri": pg_uri})
    run_cli("launch", str(cfg), "--address", ray_address, home=home, check=True)
    (run,) = cli_json("runs", "--store", pg_uri, home=home)
    assert run["status"] == "completed"
    for rank in (0, 1):
        pts = cli_json("metrics", run["id"], "--key", "train/loss", "--rank", str(rank), "--store", pg_uri, home=home)
        assert [p["step"] for p in pts["points"]] == list(range(10))
    show = cli_json("show", run["id"], "--store", pg_uri, home=home)
    assert show["config"]["tracking"]["uri"].startswith("postgresql://")
    report = cli_json("checkpoints", run["id"], "--store", pg_uri, home=home)
    assert [(c["step"], c["status"]) for c in report["checkpoints"]] == [(5, "committed"), (10, "committed")], report
    db = PgConnection(pg_uri)  # the coordinator recorded them in PostgreSQL (not only manifests at the destination)
    recorded = db.execute("SELECT step, status FROM checkpoints WHERE run_id = ? ORDER BY step", (run["id"],)).fetchall()
    db.close()
    assert (5, "committed") in recorded and (10, "committed") in recorded
    assert cli_json("runs", home=home) == []  # nothing went to the local store
