"""The tracking store under a full disk, a failed write, hostile permissions and a bad location.

No Ray here: MetricsActor is driven as a plain object (tests/test_metrics_restart.py drives it
through Ray). CLI cases run the real entry point in a subprocess.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess

import numpy as np
import pytest

from actors.metrics_actor import MetricsActor
from orchestrator.anomaly import AnomalyDetector
from orchestrator.store import Store, StoreFull, open_store
from tests.conftest import ORCH, REPO, tiny_config

POINTS = 400  # per batch: a few pages of SQLite, so the limit below is reached in a few batches


def batch(i: int) -> dict:
    """Series i's points: values that say which series they belong to."""
    return {f"key{i}": (np.arange(POINTS), np.full(POINTS, float(i)))}


def limit_pages(store: Store, extra: int) -> None:
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages + extra}")


def assert_each_series_holds_only_its_own(store: Store, run_id: str, written: dict[tuple[str, int], float]) -> None:
    assert set(store.metric_keys(run_id)) == {key for key, _ in written}
    for (key, rank), value in written.items():
        pts = store.series(run_id, key, rank=rank)
        assert [p["step"] for p in pts] == list(range(POINTS)), (key, rank)
        assert {p["value"] for p in pts} == {value}, (key, rank)  # nothing of another series
        assert sum(n for _, r, _, n in store.points.find(run_id, key) if r == rank) == POINTS  # each point once


# --- item 1: a full disk ----------------------------------------------------------------------


def test_full_disk_is_a_clear_error_and_nothing_lands_in_another_series(tmp_path):
    store = Store(tmp_path)
    limit_pages(store, 24)
    written: dict[tuple[str, int], float] = {}
    failed = None
    for i in range(200):  # bounded: the limit is reached after a handful of batches
        try:
            store.points.append("r", i % 3, 0, batch(i))
        except StoreFull as e:
            failed = i, e
            break
        written[(f"key{i}", i % 3)] = float(i)
    assert failed is not None, "the page limit was never reached"
    i, error = failed
    assert str(tmp_path / "store.db") in str(error) and "full" in str(error) and "\n" not in str(error)
    assert not store.db.in_transaction
    assert f"key{i}" not in store.metric_keys("r")  # the failed batch left nothing behind

    limit_pages(store, 100_000)  # space is freed: new series, then the failed one again
    for j in [*range(i + 1, i + 6), i]:
        store.points.append("r", j % 3, 0, batch(j))
        written[(f"key{j}", j % 3)] = float(j)
    assert_each_series_holds_only_its_own(store, "r", written)


def test_full_disk_mid_batch_of_many_keys_keeps_nothing_of_it(tmp_path):
    store = Store(tmp_path)
    store.points.append("r", 0, 0, batch(0))
    limit_pages(store, 6)
    many = {k: v for i in range(1, 40) for k, v in batch(i).items()}  # fails part-way through
    with pytest.raises(StoreFull):
        store.points.append("r", 0, 0, many, seq=1)
    limit_pages(store, 100_000)
    assert store.metric_keys("r") == ["key0"]
    assert store.points.append("r", 0, 0, many, seq=1) == 39 * POINTS  # not taken for already applied
    assert_each_series_holds_only_its_own(store, "r", {(f"key{i}", 0): float(i) for i in range(40)})


def test_metrics_actor_records_a_full_store_once_and_stores_the_batch_when_space_returns(tmp_path):
    actor = MetricsActor("r", str(tmp_path), open_store=Store, detector=AnomalyDetector())
    actor.store.points.append("r", 0, 0, batch(0))
    limit_pages(actor.store, 6)  # room for an event row, not for a batch
    big = {k: v for i in range(1, 20) for k, v in batch(i).items()}
    for seq in (1, 1, 1):  # the sender re-sends the batch it could not deliver
        with pytest.raises(StoreFull, match="is full"):
            actor.log_columns(0, seq, big)
    (event,) = actor.store.events("r", "store_full")  # once, not once per re-send
    assert event["severity"] == "error" and str(tmp_path / "store.db") in event["message"]
    assert [a["kind"] for a in actor.take_alerts()] == ["store_full"]  # the driver hears of it too

    limit_pages(actor.store, 100_000)
    assert actor.log_columns(0, 1, big) == 19 * POINTS
    assert_each_series_holds_only_its_own(actor.store, "r", {(f"key{i}", 0): float(i) for i in range(20)})
    actor.close()


# --- item 4: a batch's points and its events are one write ---------------------------------------


class Injected(RuntimeError):
    pass


def test_points_and_their_alert_are_stored_together_or_not_at_all(store_uri, monkeypatch):
    actor = MetricsActor("r", store_uri, open_store=open_store, detector=AnomalyDetector())
    nan_loss = {"train/loss": (np.array([7]), np.array([math.nan]))}  # raises a non_finite_loss alert
    real_add_event = actor.store.add_event

    def crash(*args, **kwargs):  # the process dies between the points and the event
        raise Injected

    monkeypatch.setattr(actor.store, "add_event", crash)
    with pytest.raises(Injected):
        actor.log_columns(0, 1, nan_loss)
    assert actor.store.metric_keys("r") == [] and actor.store.events("r") == []
    assert actor.take_alerts() == []

    monkeypatch.setattr(actor.store, "add_event", real_add_event)
    assert actor.log_columns(0, 1, nan_loss) == 1  # the re-sent batch: points and alert, once
    assert [e["kind"] for e in actor.store.events("r")] == ["non_finite_loss"]
    assert [a["kind"] for a in actor.take_alerts()] == ["non_finite_loss"]
    assert actor.log_columns(0, 1, nan_loss) == 0  # a third copy is recognised
    assert len(actor.store.events("r")) == 1 and len(actor.store.series("r", "train/loss", rank=0)) == 1
    actor.close()


# --- item 5: private files -------------------------------------------------------------------------


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_directory_and_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = Store(tmp_path / "a" / "home")
        store.log_metrics("r", [("k", 0, 0, 1.0, 0.0)])
        assert mode(tmp_path / "a" / "home") == 0o700
        for name in ("store.db", "store.db-wal", "store.db-shm"):
            assert mode(tmp_path / "a" / "home" / name) == 0o600, name
        store.close()
    finally:
        os.umask(old)


def test_a_store_made_readable_by_others_is_made_private_on_open(tmp_path):
    Store(tmp_path).close()
    os.chmod(tmp_path / "store.db", 0o644)
    Store(tmp_path).close()
    assert mode(tmp_path / "store.db") == 0o600


# --- item 11 (store side): where the store cannot be, through the CLI --------------------------------


def cli(*args: str, home, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """The real entry point. `unprivileged`: as root, without the capabilities that ignore file
    modes, so a read-only directory is read-only to it too."""
    env = {**os.environ, "ORCHESTRATOR_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if unprivileged and os.geteuid() == 0 else []
    return subprocess.run([*prefix, *ORCH, *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "internal error" not in lines[0] and "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("argv", [["show", "x"], ["metrics", "x", "--key", "k"], ["note", "x", "hello"]])
def test_read_commands_do_not_create_a_store(tmp_path, argv):
    home = tmp_path / "nothing-here"
    line = one_line(cli(*argv, home=home))
    assert f"no tracking store at {home}" in line and "orchestrator launch" in line
    assert not home.exists()


def test_runs_on_no_store_lists_nothing_and_makes_nothing(tmp_path):
    home = tmp_path / "nothing-here"
    proc = cli("runs", "--json", home=home)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [] and not home.exists()
    proc = cli("runs", home=home)
    assert proc.returncode == 0 and "no runs yet" in proc.stdout and not home.exists()


def test_home_that_is_a_file_is_one_line(tmp_path, tiny_data):
    home = tmp_path / "afile"
    home.write_text("not a directory\n")
    line = one_line(cli("runs", home=home))
    assert f"{home} is a file" in line and "expected a directory" in line
    cfg = tiny_config(tmp_path, tiny_data)
    line = one_line(cli("launch", str(cfg), home=home))  # fails before any Ray cluster starts
    assert f"{home} is a file" in line
    assert home.read_text() == "not a directory\n"


def test_corrupt_store_is_one_line_and_left_as_it_was(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    garbage = b"this is not SQLite" * 400
    (home / "store.db").write_bytes(garbage)
    for argv in (["runs"], ["show", "x", "--json"]):
        line = one_line(cli(*argv, home=home))
        assert f"{home / 'store.db'} is not a readable tracking store" in line
    assert (home / "store.db").read_bytes() == garbage


def test_read_only_store_directory_is_one_line(tmp_path, tiny_data):
    home = tmp_path / "home"
    Store(home).close()
    fresh = tmp_path / "ro" / "home"
    fresh.parent.mkdir()
    os.chmod(home, 0o500)
    os.chmod(fresh.parent, 0o500)
    try:
        line = one_line(cli("runs", home=home, unprivileged=True))
        assert str(home / "store.db") in line and "expected a directory this user can write" in line
        line = one_line(cli("note", "x", "y", home=fresh, unprivileged=True))
        assert f"no tracking store at {fresh}" in line
        line = one_line(cli("launch", str(tiny_config(tmp_path, tiny_data)), home=fresh, unprivileged=True))
        assert f"cannot create the tracking store directory {fresh}" in line
    finally:
        os.chmod(home, 0o700)
        os.chmod(fresh.parent, 0o700)
