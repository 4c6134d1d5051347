"""Checkpointing without Ray or S3: slots, retries, retention, format, commit, verify, fallback."""

from __future__ import annotations

import io
import pickle
import random

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from actors.checkpoint_coordinator import CheckpointCoordinator
from checkpointing import format, retention
from checkpointing.config import BestMode, CheckpointConfig
from checkpointing.errors import CheckpointError, CorruptCheckpoint
from checkpointing.layout import scan
from checkpointing.loader import load_latest
from checkpointing.retry import backoff_delay, with_retries
from checkpointing.slots import SlotTable
from checkpointing.storage import check_destination, resolve_uri
from tests.s3_server import run_ranks


def fast_cfg(**kw) -> CheckpointConfig:
    base = dict(every_steps=5, start_jitter_s=0.0, backoff_s=0.001, max_backoff_s=0.01, retries=3,
                commit_timeout_s=30)
    return CheckpointConfig(**{**base, **kw})


# --- slots -------------------------------------------------------------------------------------


def test_slots_hold_global_and_per_node_limits_and_reclaim_expired_leases():
    now = [0.0]
    t = SlotTable(max_global=3, per_node=2, lease_s=10, clock=lambda: now[0])
    a, b = t.acquire(0, "n1"), t.acquire(1, "n1")
    assert a and b and t.acquire(2, "n1") is None  # node n1 is full
    c = t.acquire(3, "n2")
    assert c and t.acquire(4, "n3") is None  # the run is full
    assert t.release(a) and t.acquire(4, "n3")
    assert t.peak == 3
    now[0] = 11.0  # every lease expired: a dead rank does not hold slots forever
    assert t.in_flight() == 0 and t.reclaimed == 3
    assert not t.release(b)


def test_release_rank_frees_what_a_dead_rank_held():
    t = SlotTable(max_global=2, per_node=2, lease_s=100)
    t.acquire(5, "n")
    t.acquire(5, "n")
    assert t.acquire(1, "n") is None
    assert t.release_rank(5) == 2 and t.acquire(1, "n")


# --- retries -----------------------------------------------------------------------------------


def test_transient_errors_are_retried_with_growing_jittered_backoff():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise OSError("503 SlowDown")
        return "ok"

    assert with_retries(flaky, retries=5, backoff_s=1.0, max_backoff_s=3.0, sleep=sleeps.append,
                        rng=random.Random(0)) == "ok"
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0 <= s <= min(3.0, 2**i) for i, s in enumerate(sleeps))


def test_retries_are_bounded_and_permanent_errors_are_not_retried():
    sleeps = []
    with pytest.raises(ConnectionResetError):
        with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), retries=2, backoff_s=0.1,
                     max_backoff_s=1, sleep=sleeps.append)
    assert len(sleeps) == 2
    sleeps.clear()
    with pytest.raises(PermissionError):
        with_retries(lambda: (_ for _ in ()).throw(PermissionError("denied")), retries=5, backoff_s=0.1,
                     max_backoff_s=1, sleep=sleeps.append)
    assert sleeps == []


def test_backoff_is_capped():
    rng = random.Random(1)
    assert all(backoff_delay(20, 0.5, 4.0, rng) <= 4.0 for _ in range(100))


# --- retention ---------------------------------------------------------------------------------


def test_retention_plan_keeps_last_every_and_best():
    steps = [5, 10, 15, 20, 25, 30]
    assert retention.plan(steps, keep_last=2) == {25, 30}
    assert retention.plan(steps, keep_last=1, keep_every=10) == {10, 20, 30}
    metrics = {5: {"eval/loss": 3.0}, 10: {"eval/loss": 1.0}, 15: {"eval/loss": 2.0}, 30: {}}
    assert retention.plan(steps, keep_last=1, best_metric="eval/loss", metrics=metrics) == {10, 30}
    assert retention.plan(steps, keep_last=1, best_metric="eval/loss", mode=BestMode.MAX, metrics=metrics) == {5, 30}
    assert retention.plan([], keep_last=3) == set()


# --- format ------------------------------------------------------------------------------------


def test_rng_states_round_trip_under_weights_only():
    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    saved = format.decode(format.encode(format.rng_state()))
    before = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    format.set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == before


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_decode_refuses_arbitrary_pickles():
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        format.decode(buf.getvalue())


def test_numpy_values_in_sampler_state_survive_weights_only():
    import numpy as np

    files = format.capture(step=3, rank=0, world_size=1, run_id="r", model=None, optimizer=None, config={},
                           sampler_state={"seed": np.int64(7), "order": np.arange(3), "mode": "block"})
    back = format.decode(format.encode(files[format.rank_file(0)]))["sampler"]
    assert back["seed"] == 7 and type(back["seed"]) is int and back["order"].tolist() == [0, 1, 2]


def test_capture_copies_to_host_so_training_can_go_on():
    model = torch.nn.Linear(2, 2)
    files = format.capture(step=1, rank=0, world_size=1, run_id="r", model=model, optimizer=None,
                           sampler_state={}, config={})
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(files[format.MODEL]["weight"], model.weight)
    rank1 = format.capture(step=1, rank=1, world_size=2, run_id="r", model=model, optimizer=None,
                           sampler_state={}, config={})
    assert set(rank1) == {format.rank_file(1)}  # replicated weights are written once, by rank 0


# --- write, commit, verify, fall back (local folder) --------------------------------------------


def test_two_ranks_commit_and_load_latest_verifies(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "ck")
    results, coord = run_ranks(fs, root, world_size=2, steps=12, cfg=fast_cfg())
    assert [r.status for r in results[0]] == ["committed"] * 3
    assert [r.status for r in results[1]] == ["uploaded"] * 3
    assert [o["step"] for o in coord.history()] == [5, 10, 12]
    assert scan(fs, root).committed == [5, 10, 12]
    ck = load_latest(root, rank=1)
    assert ck.step == 12 and ck.rank_state["sampler"] == {"samples_consumed": 96}
    assert ck.meta["run_id"] == "run-1" and ck.meta["config"] == {"run": {"seed": 0}}
    assert set(ck.model) == {"0.weight", "0.bias", "2.weight", "2.bias"} and ck.optimizer["state"]
    assert load_latest(root, rank=2).rank_state is None  # N=2 saved, M=3 loads: rank 2 starts fresh
    names = sorted(f["name"] for f in ck.manifest["files"])
    assert names == ["meta.pt", "model.pt", "optim.pt", "rank_00000.pt", "rank_00001.pt"]


def test_flipped_byte_is_detected_and_loader_falls_back(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "ck")
    run_ranks(fs, root, world_size=2, steps=10, cfg=fast_cfg())
    target = tmp_path / "ck" / "step_00000010" / "rank_00001.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    seen = []
    ck = load_latest(root, rank=0, on_corrupt=seen.append)
    assert ck.step == 5  # every rank reaches the same verdict: all files are checked
    assert [e.step for e in seen] == [10] and "sha256" in seen[0].reason

    from checkpointing.records import CheckpointRecords, corrupt_recorder

    db = tmp_path / "store.db"
    assert load_latest(root, rank=1, on_corrupt=corrupt_recorder(db, "run-1", root)).step == 5
    (row,) = CheckpointRecords(db).list("run-1")
    assert (row["step"], row["status"]) == (10, "corrupt") and "rank_00001.pt" in row["error"]


def test_folder_without_manifest_is_ignored(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "ck")
    run_ranks(fs, root, world_size=1, steps=5, cfg=fast_cfg())
    (tmp_path / "ck" / "step_00000010").mkdir()
    (tmp_path / "ck" / "step_00000010" / "model.pt").write_bytes(b"half a write")
    assert scan(fs, root).partial == [10]
    assert load_latest(root).step == 5
    assert load_latest(str(tmp_path / "nothing")) is None


class FailingFS(LocalFileSystem):
    """Every write under a folder named in `broken` fails, as a bucket that keeps throttling would."""

    broken: tuple[str, ...] = ()

    def pipe_file(self, path, value, **kwargs):
        if any(b in str(path) for b in self.broken):
            raise OSError("503 SlowDown (persistent)")
        return super().pipe_file(path, value, **kwargs)


def test_a_checkpoint_that_cannot_be_written_is_failed_and_training_goes_on(tmp_path):
    fs = FailingFS(skip_instance_cache=True)
    fs.broken = ("step_00000010/rank_00001",)
    root = str(tmp_path / "ck")
    results, coord = run_ranks(fs, root, world_size=2, steps=15, cfg=fast_cfg(retries=2))
    assert [(r.step, r.status) for r in results[0]] == [(5, "committed"), (10, "failed"), (15, "committed")]
    failed = [o for o in coord.history() if o["status"] == "failed"]
    assert len(failed) == 1 and "rank 1" in failed[0]["error"] and "SlowDown" in failed[0]["error"]
    assert scan(fs, root).committed == [5, 15]
    assert scan(fs, root).partial == []  # the failed step's leftovers were cleaned after step 15 committed


def test_the_ranks_metrics_are_flushed_before_its_part_is_reported(tmp_path):
    """The flush runs in the upload thread (not on the training thread), and a checkpoint commits
    only after it: a restore never skips metrics that were never stored."""
    from checkpointing.client import LocalClient
    from checkpointing.writer import Checkpointer

    order = []

    class Recording(LocalClient):
        def call(self, method, *args, **kwargs):
            order.append(method)
            return super().call(method, *args, **kwargs)

    coord = CheckpointCoordinator("r", str(tmp_path / "ck"), 1, max_concurrent_writes=1, per_node_writes=1,
                                  slot_lease_s=5)
    ck = Checkpointer(fs=fsspec.filesystem("file"), root=str(tmp_path / "ck"), client=Recording(coord), rank=0,
                      world_size=1, run_id="r", config={}, cfg=fast_cfg(), flush=lambda: order.append("flush"))
    model = torch.nn.Linear(2, 2)
    ck.save(5, model=model, optimizer=None, sampler_state={})
    assert ck.wait().status == "committed"
    assert "flush" in order and "report" in order
    assert order.index("flush") < order.index("report") and order.count("flush") == 1


def test_retention_keeps_the_right_steps_and_best(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "ck")
    cfg = fast_cfg(every_steps=5, keep_last=2, keep_every=20, keep_best="eval/loss")
    losses = {5: 4.0, 10: 3.0, 15: 0.5, 20: 2.0, 25: 1.5, 30: 1.2, 35: 1.1}
    run_ranks(fs, root, world_size=1, steps=35, cfg=cfg, metrics_of=lambda s: {"eval/loss": losses[s]})
    assert scan(fs, root).committed == [15, 20, 30, 35]


def test_slot_limit_holds_with_four_ranks(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "ck")
    cfg = fast_cfg(max_concurrent_writes=2, per_node_writes=1)
    results, coord = run_ranks(fs, root, world_size=4, steps=10, cfg=cfg, nodes={0: "a", 1: "a", 2: "b", 3: "b"})
    assert coord.slots.peak <= 2 and coord.stats()["in_flight"] == 0
    assert [r.status for r in results[0]] == ["committed", "committed"]


# --- destination --------------------------------------------------------------------------------


def test_default_destination_is_under_home(tmp_path):
    assert resolve_uri(None, "run-7", tmp_path) == str(tmp_path / "checkpoints" / "run-7")
    assert resolve_uri("s3://b/p/", "run-7", tmp_path) == "s3://b/p"


@pytest.mark.parametrize("uri", ["nosuchproto://bucket/x", "{file}/sub"])
def test_unusable_destination_is_one_clear_error(tmp_path, uri):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(CheckpointError) as e:
        check_destination(uri.format(file=f))
    assert "checkpoint.uri=" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_manifest_is_reported(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "ck")
    run_ranks(fs, root, world_size=1, steps=10, cfg=fast_cfg())
    (tmp_path / "ck" / "step_00000010" / "MANIFEST.json").write_text("{not json")
    seen: list[CorruptCheckpoint] = []
    assert load_latest(root, on_corrupt=seen.append).step == 5
    assert seen and "manifest" in seen[0].reason


def test_coordinator_records_outcomes_in_the_store(tmp_path):
    from checkpointing.records import CheckpointRecords
    from orchestrator.store import Store

    store = Store(tmp_path / "home")
    coord = CheckpointCoordinator("run-1", "x", 1, max_concurrent_writes=1, per_node_writes=1, slot_lease_s=5,
                                  store_root=str(store.root))
    coord.finish(5, "committed", bytes=10, blocked_s=0.1, upload_s=0.5, uri="x/step_00000005")
    coord.finish(10, "failed", error="rank 0: OSError: SlowDown")
    rows = CheckpointRecords(store.path).list("run-1")
    assert [(r["step"], r["status"]) for r in rows] == [(5, "committed"), (10, "failed")]


def test_report_lists_committed_failed_and_corrupt(tmp_path):
    from orchestrator.checkpoint_views import checkpoint_report, report_rows
    from orchestrator.store import Store

    store = Store(tmp_path / "home")
    root = str(tmp_path / "ck")
    store.create_run(run_id="run-1", name="r", config={"checkpoint": {"uri": root, "storage_options": {}}},
                     git_commit=None, host="h", command="", world_size=2)
    fs = FailingFS(skip_instance_cache=True)
    fs.broken = ("step_00000010/model.pt",)
    coord = CheckpointCoordinator("run-1", root, 2, max_concurrent_writes=2, per_node_writes=2, slot_lease_s=60,
                                  store_root=str(store.root))
    run_ranks(fs, root, world_size=2, steps=15, cfg=fast_cfg(retries=1), coordinator=coord)
    target = tmp_path / "ck" / "step_00000015" / "optim.pt"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))

    plain = checkpoint_report("run-1", store=store)
    assert [(c["step"], c["status"]) for c in plain["checkpoints"]] == [(5, "committed"), (10, "failed"),
                                                                        (15, "committed")]
    checked = checkpoint_report("run-1", store=store, check=True)
    rows = {c["step"]: c for c in checked["checkpoints"]}
    assert rows[15]["status"] == "corrupt" and "optim.pt" in rows[15]["error"]
    assert rows[5]["bytes"] > 0 and rows[5]["upload_s"] > 0 and rows[5]["present"]
    assert "SlowDown" in rows[10]["error"]
    assert checkpoint_report("run-1", store=store)["checkpoints"][2]["status"] == "corrupt"  # recorded
    table = report_rows(checked)
    assert table[0][:2] == ("STEP", "STATUS") and len(table) == 4


def test_a_restarted_rank_does_not_leave_stale_reports_or_slots():
    coord = CheckpointCoordinator("run-1", "x", 2, max_concurrent_writes=1, per_node_writes=1, slot_lease_s=600)
    assert coord.acquire(1, "n") is not None  # rank 1 dies holding the only slot...
    coord.report(10, 1, {"files": [{"name": "rank_00001.pt"}], "blocked_s": 0, "upload_s": 0})
    assert coord.join(1)["run_id"] == "run-1"  # ...and its next incarnation joins
    assert coord.shards(10) == {} and coord.acquire(0, "n") is not None

