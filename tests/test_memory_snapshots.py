"""In-memory snapshots (checkpoint.memory_every_steps): the choice of what to restore, the keeper's
bookkeeping and memory checks, a bit-exact round trip, and on a 2-node Ray cluster a SIGKILLed
rank restored from its peer node's memory, ending bit for bit where a fault-free run ends; and the
fallback to durable checkpoints when a snapshot exceeds checkpoint.memory_limit_mb. FSDP: each rank
snapshots its own shards (gloo ranks of our own, and the built-in loop on the 2-node cluster), and a
group that shrank falls back to the durable checkpoint."""

from __future__ import annotations

import random
import subprocess

import numpy as np
import pytest
import torch

from actors.snapshot_keeper import Keepers, SnapshotKeeper
from checkpointing import memory
from checkpointing.client import LocalClient
from common.errors import ConfigError
from orchestrator.gpt import GPT
from orchestrator.snapshots import choose
from tests.conftest import cli_json, run_cli, tiny_config

MB = 2**20


# --- what to restore ------------------------------------------------------------------------


def snaps(*pairs, world=2):
    return [{"rank": r, "step": s, "world_size": world} for r, s in pairs]


def test_choose_takes_the_newest_step_every_rank_has():
    inv = {"a": snaps((0, 8), (0, 12), (1, 8)), "b": snaps((1, 12), (1, 16))}
    c = choose(inv, world_size=2, durable_step=5)
    assert (c.step, c.holders) == (12, {0: ("a",), 1: ("b",)})
    # rank 1 still sending 16 when the failure struck: 12 is the newest both have
    assert choose(inv, world_size=2, durable_step=None).step == 12


def test_choose_falls_back_with_the_reason():
    inv = {"a": snaps((0, 8), (1, 8))}
    c = choose(inv, world_size=2, durable_step=10)
    assert c.step is None and "older than the durable checkpoint (step 10)" in c.why
    assert choose(inv, world_size=2, durable_step=8).step == 8  # the same state: memory reads quicker
    c = choose({"a": snaps((0, 8), (0, 12))}, world_size=2, durable_step=None)
    assert c.step is None and "rank(s) 1 have none left" in c.why
    c = choose({"a": snaps((0, 8), (1, 4))}, world_size=2, durable_step=None)
    assert c.step is None and "rank 0 step 8, rank 1 step 4" in c.why
    assert "no snapshot survived" in choose({"a": []}, world_size=2, durable_step=None).why
    assert "this group has 1" in choose(inv, world_size=1, durable_step=None).why  # an elastic shrink
    # after silent corruption only steps up to the last good check may be used
    assert choose({"a": snaps((0, 8), (1, 8), (0, 12), (1, 12))}, world_size=2, durable_step=None,
                  at_most=10).step == 8


def test_a_shrunk_fsdp_group_falls_back_to_the_durable_checkpoint(tmp_path):
    """An elastic FSDP run loses a node: the new group has 1 rank, the snapshots are of 2 (each
    rank's own shards), so the controller says why and restores the durable (DCP) checkpoint."""
    from tests.test_controller import died, setup

    c, group, store, lines = setup(tmp_path, [["step"] * 3 + ["ckpt"] + ["step"] * 5 + [died()], ["done"]],
                                   cfg={"scaling": {"min_workers": 1}, "parallelism": {"strategy": "fsdp"},
                                        "checkpoint": {"memory_every_steps": 4}})
    reserve = group.reserve

    def shrinking(sizes, avoid):  # rank 1's node is gone after the first group
        group.free["workers"] = 2 if not group.reserved else 1
        return reserve(sizes, avoid)

    group.reserve = shrinking
    group.snapshot_inventory = lambda unreachable=(): {"node-0": snaps((1, 4), (1, 8)), "node-1": snaps((0, 4), (0, 8))}
    c.run()
    assert [n for n, _ in group.reserved] == [2, 1]
    assert group.step0 == 4  # the durable checkpoint, not the snapshots of step 8
    (fallback,) = store.events("r1", kind="snapshot_fallback")
    assert "this group has 1" in fallback["data"]["why"] and "restores only onto the world size" in fallback["message"]
    assert fallback["data"]["durable_step"] == 4 and "restoring the durable checkpoint (step 4)" in fallback["message"]
    assert not store.events("r1", kind="snapshot_restore")
    assert any(line.startswith("SNAPSHOT in-memory snapshots not used") for line in lines)


def test_the_keeper_on_a_node_out_of_reach_is_not_asked_after_its_rank_is_lost(tmp_path):
    """Ray takes ~2 s to fail each call to an actor on a node it lost its connection to: the
    attempt's bookkeeping must not ask that node's keeper (the restart waits on it)."""
    from orchestrator.failures import Failure, FailureKind
    from tests.test_controller import died, setup

    unreachable = Failure(FailureKind.DIED, "rank 1 on node node-1 became unreachable", rank=1, node_id="node-1",
                          data={"unconfirmed": True, "unreachable": True})
    c, group, store, lines = setup(tmp_path, [["step"] * 3 + ["ckpt"] + ["step"] * 5 + [unreachable], ["step", died()],
                                              ["done"]], cfg={"checkpoint": {"memory_every_steps": 4}})
    asked = []

    def inventory(unreachable=()):
        asked.append(unreachable)
        return {"node-0": snaps((1, 4), (1, 8)), "node-1": snaps((0, 4), (0, 8))}

    group.snapshot_inventory = inventory
    train = group.train
    group.train = lambda step0, source_uri, skipped, snapshot=None: train(step0, source_uri, skipped)
    c.run()
    assert asked[0] == ("node-1",)  # the unconfirmed loss: that node's keeper is left out
    assert ("node-1",) not in asked[1:] and asked[1:], asked  # a confirmed death (its node fine): every keeper


def test_keepers_forget_a_node_out_of_reach_without_calling_it():
    k = Keepers("run:id")
    k.by_node = {"gone": object()}  # any call to it would fail the test (no such method)
    assert k.inventory(unreachable=("gone",)) == {} and k.by_node == {}


def test_a_keeper_started_in_this_attempt_is_not_waited_for(monkeypatch):
    """A rank moved to a node new to the run gets a new keeper there: it holds nothing and refuses
    older attempts' sends from its start, so the restart does not wait ~1 s for its process to
    begin(); every keeper that may hold snapshots still does."""
    import ray

    class Handle:
        def __init__(self):
            self.calls = []
            self.begin = self  # handle.begin.remote(...)

        def remote(self, *args):
            self.calls.append(args)
            return args

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    k = Keepers("run:id")
    old, found = Handle(), Handle()
    k.by_node = {"old": old, "new": object(), "found": found}  # a call to "new" would fail the test
    k.born = {"old": 0, "new": 3}  # "found": found again by name (after a partition), may hold snapshots
    k.begin(3, 12)
    assert old.calls == [(3, 12)] and found.calls == [(3, 12)]
    k.born["new"] = 2  # started in an earlier attempt: it may hold snapshots now
    k.by_node["new"] = new = Handle()
    k.begin(4, 20)
    assert new.calls == [(4, 20)]

    born = SnapshotKeeper("node-n", attempt=3, free_bytes=lambda: 10**12, headroom_bytes=0)
    assert "attempt 2 is over" in born.reserve(0, 16, 100, attempt=2)
    assert born.reserve(0, 16, 100, attempt=3) is None


def test_each_node_s_ranks_send_to_their_own_keeper_and_the_next_node_s():
    assert Keepers.targets(["n1", "n1", "n2", "n2"]) == {"n1": ("n1", "n2"), "n2": ("n2", "n1")}
    assert Keepers.targets(["n1", "n2", "n3"]) == {"n1": ("n1", "n2"), "n2": ("n2", "n3"), "n3": ("n3", "n1")}
    assert Keepers.targets(["n1", "n1"]) == {"n1": ("n1",)}  # one node: its own keeper


def test_every_rank_keeps_a_snapshot_after_any_one_node_is_lost():
    """With a snapshot on the rank's own node and one on the next, losing any one node leaves
    every rank (on it or not) a copy: the group restores from memory, not the durable checkpoint.
    (One copy on the next node only would lose node i-1's ranks' with node i.)"""
    nodes = ["n0", "n0", "n1", "n1", "n2", "n2"]  # 6 ranks on 3 nodes
    targets = Keepers.targets(nodes)
    held = {n: [] for n in set(nodes)}
    for rank, node in enumerate(nodes):
        for t in targets[node]:
            held[t] += snaps((rank, 8), world=6)
    for lost in sorted(held):
        c = choose({n: s for n, s in held.items() if n != lost}, world_size=6, durable_step=None)
        assert c.step == 8 and sorted(c.holders) == list(range(6)), (lost, c.why)
        assert all(lost not in c.holders[r] and c.holders[r] for r in range(6))


def test_a_snapshot_goes_to_every_keeper_and_one_refusal_is_said_once():
    events = []
    fine = SnapshotKeeper("node-a", free_bytes=lambda: 10**12, headroom_bytes=0)
    full = SnapshotKeeper("node-b", free_bytes=lambda: 1 * MB, headroom_bytes=2 * MB)
    staged = []
    snap = memory.Snapshotter(every_steps=1, limit_bytes=100 * MB, rank=0, world_size=2, run_id="r", attempt=0,
                              keepers=[("node-a", LocalClient(fine)), ("node-b", LocalClient(full))],
                              report=lambda *a: events.append(a), stage=lambda parts: staged.append(1) or parts)
    model, opt = fresh()
    for step in (1, 2):
        snap.take(step, model=model, optimizer=opt, sampler_state={})
    snap.close()
    assert staged == [1, 1]  # one staging per snapshot, whatever the number of keepers
    assert [(s["rank"], s["step"]) for s in fine.inventory()] == [(0, 1), (0, 2)] and full.inventory() == []
    assert snap.sent == []  # not every copy was taken
    (event,) = events  # said once, not at every snapshot
    kind, _, message, step, data = event
    assert (kind, step, data["kept_on"], data["refused_by"]) == ("snapshot_skipped", 1, ["node-a"], ["node-b"])
    assert "kept on node-a only" in message and "node-b" in message and "must stay free" in message
    assert snap.holdings() == 5  # its own buffer and two per keeper


# --- the keeper -----------------------------------------------------------------------------


def test_keeper_keeps_the_two_newest_and_drops_a_replayed_future():
    k = SnapshotKeeper("node-a", free_bytes=lambda: 100 * MB, headroom_bytes=0)
    for step in (4, 8, 12):
        assert k.reserve(0, step, 3, attempt=0) is None
        assert k.put(0, step, 2, 0, [b"a", np.frombuffer(b"bc", dtype=np.uint8)]) is None
    assert [s["step"] for s in k.inventory()] == [8, 12] and k.inventory()[0]["bytes"] == 3
    assert [bytes(p) for p in k.get(0, 12)] == [b"a", b"bc"]
    assert k.put(0, 16, 2, 0, [b"abc"]) is not None  # nothing sent without a reservation
    assert k.begin(1, keep_through=8) == 1  # the new group resumes at 8: step 12 is a future it replays
    assert [s["step"] for s in k.inventory()] == [8]
    assert "attempt 0 is over" in k.reserve(0, 12, 3, attempt=0)  # a send of the killed group, late
    assert k.begin(2, keep_through=None) == 1 and k.inventory() == []


def test_keeper_refuses_what_its_node_has_no_room_for():
    free = [60 * MB]
    k = SnapshotKeeper("node-abcdef123456", free_bytes=lambda: free[0], headroom_bytes=50 * MB)
    assert k.reserve(0, 4, 8 * MB, attempt=0) is None  # 60 - 8 >= 50
    k.put(0, 4, 2, 0, [b"x" * (8 * MB)])
    free[0] -= 8 * MB
    why = k.reserve(1, 4, 8 * MB, attempt=0)
    assert why is not None and "52.0 MB free" in why and "8.0 MB" in why and "50 MB must stay free" in why
    assert [s["rank"] for s in k.inventory()] == [0]  # nothing of rank 1 was taken
    # rank 0's next snapshot may use the room of its oldest, which it lets go (two are kept)
    k.reserve(0, 8, 1, attempt=0)
    k.put(0, 8, 2, 0, [b"y"])
    free[0] = 52 * MB + 1
    assert k.reserve(0, 12, 8 * MB, attempt=0) is None  # step 4's 8 MB freed first
    assert [s["step"] for s in k.inventory()] == [8]


# --- the rank side, no Ray --------------------------------------------------------------------


def train_steps(model, opt, n, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    losses = []
    for _ in range(n):
        x = torch.randint(0, 50, (4, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 50), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def fresh(seed=0):
    torch.manual_seed(seed)
    model = GPT(vocab_size=50, block_size=16, n_layer=1, n_head=2, d_model=32, dropout=0.2)  # dropout: RNG matters
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_snapshot_round_trip_is_bit_exact():
    from checkpointing.format import set_rng_state

    events = []
    keeper = SnapshotKeeper("node-b", free_bytes=lambda: 10**12, headroom_bytes=0)
    snap = memory.Snapshotter(every_steps=3, limit_bytes=100 * MB, rank=0, world_size=1, run_id="r", attempt=0,
                              keepers=[("", LocalClient(keeper))], report=lambda *a: events.append(a))
    model, opt = fresh()
    train_steps(model, opt, 3, gen_seed=1)
    assert snap.due(3) and not snap.due(4)
    random.seed(5)
    np.random.seed(5)
    snap.take(3, model=model, optimizer=opt, sampler_state={"samples_consumed": np.int64(12)})
    snap.close()
    after = train_steps(model, opt, 4, gen_seed=2)  # dropout draws from the torch RNG
    expected_py, expected_np = random.random(), np.random.rand()
    assert snap.sent == [3] and not events and len(snap.blocked) == 1

    loaded = memory.as_loaded(keeper.get(0, 3), where="memory://node-b")
    model2, opt2 = fresh(seed=99)  # different weights until restored
    model2.load_state_dict(loaded.model)
    opt2.load_state_dict(loaded.optimizer)
    set_rng_state(loaded.rank_state["rng"])
    assert loaded.step == 3 and loaded.rank_state["sampler"] == {"samples_consumed": 12}
    assert train_steps(model2, opt2, 4, gen_seed=2) == after
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True))
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)


def test_snapshot_over_the_limit_is_skipped_before_any_copy():
    events = []
    keeper = SnapshotKeeper("node-b", free_bytes=lambda: 10**12, headroom_bytes=0)
    model, opt = fresh()
    train_steps(model, opt, 1, gen_seed=1)
    size = memory.state_bytes(model.state_dict(), opt.state_dict())
    assert size > 0
    snap = memory.Snapshotter(every_steps=1, limit_bytes=size, rank=1, world_size=2, run_id="r", attempt=0,
                              keepers=[("", LocalClient(keeper))], report=lambda *a: events.append(a))
    for step in (1, 2):
        snap.take(step, model=model, optimizer=opt, sampler_state={})
    snap.close()
    assert keeper.inventory() == [] and snap.blocked == []  # not even the host copy was made
    assert len(events) == 1  # said once, not at every snapshot
    kind, severity, message, step, data = events[0]
    assert (kind, step, data["reason"], data["bytes"], data["limit_bytes"]) == ("snapshot_skipped", 1, "limit", 3 * size, size)
    assert "over checkpoint.memory_limit_mb" in message and "durable checkpoints only" in message


def test_snapshot_refused_by_the_keeper_is_reported():
    events = []
    keeper = SnapshotKeeper("node-c", free_bytes=lambda: 1 * MB, headroom_bytes=2 * MB)
    snap = memory.Snapshotter(every_steps=1, limit_bytes=100 * MB, rank=0, world_size=2, run_id="r", attempt=0,
                              keepers=[("node-c", LocalClient(keeper))], report=lambda *a: events.append(a))
    model, opt = fresh()
    snap.take(1, model=model, optimizer=opt, sampler_state={})
    snap.close()
    assert keeper.inventory() == [] and snap.sent == []
    assert [e[0] for e in events] == ["snapshot_skipped"] and events[0][4]["reason"] == "keeper"
    assert "must stay free" in events[0][2] and "node-c" in events[0][2]


def test_config_checks(tmp_path, tiny_data):
    from orchestrator.config import load_config

    cfg = tiny_config(tmp_path, tiny_data)
    assert load_config(cfg, ["checkpoint.memory_every_steps=5"]).checkpoint.memory_every_steps == 5
    with pytest.raises(ConfigError, match="memory_every_steps"):
        load_config(cfg, ["checkpoint.memory_every_steps=-1"])
    with pytest.raises(ConfigError, match="need the built-in training loop or a function"):
        load_config(cfg, ["checkpoint.memory_every_steps=5", "entrypoint.script=x.py"])
    # sharded state is snapshotted too (each rank its own slices: below)
    fsdp = load_config(cfg, ["checkpoint.memory_every_steps=5", "parallelism.strategy=fsdp"])
    assert (fsdp.checkpoint.memory_every_steps, fsdp.parallelism.strategy.value) == (5, "fsdp")


# --- FSDP: each rank snapshots its own slices (gloo ranks of our own, no Ray) ------------------------


def _fsdp_snapshot_round_trip(rank: int, world: int, port: int, out: str) -> None:
    """Built-in layout (model + optimizer objects) and a function's DTensor state dicts through
    ctx: snapshot after 3 steps, train 2 more; restore each into differently initialised FSDP ranks,
    train the same 2 steps: the same state, bit for bit."""
    from checkpointing import format
    from checkpointing.format import rng_state, set_rng_state
    from orchestrator.restore import restore_state
    from tests.test_fsdp import _build, _join, _sampler, _train
    from tests.test_function_fsdp import Blocks, Points, _context, _steps, _whole

    _join(rank, world, port)
    events = []

    def snapshotter(keeper, every, limit=100 * MB, report=events.append):
        return memory.Snapshotter(every_steps=every, limit_bytes=limit, rank=rank, world_size=world, run_id="r",
                                  attempt=0, keepers=[("", LocalClient(keeper))], report=lambda *a: report(a))

    # 1. the built-in loop's layout: {"model": module, "optimizer": optimizer}
    keeper = SnapshotKeeper(f"node-{rank}", free_bytes=lambda: 10**12, headroom_bytes=0)
    model, inner, opt = _build(0, "fsdp", world)
    _train(model, opt, 3, rank=rank, world=world)
    snap = snapshotter(keeper, 3)
    snap.take(3, model=inner, optimizer=opt, sampler_state=_sampler().state_dict(3))
    snap.close()
    rng = rng_state()
    at3 = _whole(inner, opt)
    _train(model, opt, 2, rank=rank, world=world)
    at5 = _whole(inner, opt)
    loaded = memory.as_loaded(keeper.get(rank, 3), where=f"memory://node-{rank}")
    model2, inner2, opt2 = _build(99, "fsdp", world)
    torch.manual_seed(1234)  # other RNG streams: the restore puts this rank's back
    step = restore_state(loaded, model=inner2, optimizer=opt2, sampler=_sampler(), seed=0, rank=rank, world_size=world)
    restored = _whole(inner2, opt2)
    same_rng = torch.equal(rng_state()["torch"], rng["torch"])
    _train(model2, opt2, 2, rank=rank, world=world)
    builtin = {"step": step, "sharded": loaded.sharded, "at3": at3, "restored": restored, "at5": at5,
               "again5": _whole(inner2, opt2), "same_rng": same_rng, "snapshot_bytes": keeper.inventory()[0]["bytes"],
               "whole_bytes": memory.state_bytes(at3)}
    # over checkpoint.memory_limit_mb (counted on this rank's slices): an event, no snapshot, no copy
    over, local = [], memory.state_bytes(*format.sharded_state(inner2, opt2).values())
    keeper = SnapshotKeeper(f"node-{rank}", free_bytes=lambda: 10**12, headroom_bytes=0)
    snap = snapshotter(keeper, 1, limit=3 * local - 1, report=over.append)
    snap.take(6, model=inner2, optimizer=opt2, sampler_state=_sampler().state_dict(6))
    snap.close()
    builtin |= {"over": over, "over_kept": keeper.inventory(), "local_bytes": local}

    # 2. a function's ctx.save of its state dicts (DTensors), ctx.restore(into=...)
    keeper = SnapshotKeeper(f"node-{rank}", free_bytes=lambda: 10**12, headroom_bytes=0)
    ctx = _context(rank, world)
    ctx._services.snapshots = snapshotter(keeper, 3)
    model = ctx.prepare(Blocks())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = ctx.data_loader(Points(), 2)
    _steps(ctx, model, opt, loader, range(3))  # a snapshot at 3 steps done
    ctx._services.snapshots.close()
    f_at3, draw, position = _whole(model, opt), torch.rand(4), loader.position
    set_rng_state(memory.as_loaded(keeper.get(rank, 3), where="").rank_state["rng"])  # the draw above undone
    _steps(ctx, model, opt, loader, range(3, 5))
    f_at5 = _whole(model, opt)
    ctx.close()

    ctx = _context(rank, world, loaded=memory.as_loaded(keeper.get(rank, 3), where=f"memory://node-{rank}"))
    torch.manual_seed(99)
    model = ctx.prepare(Blocks())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = ctx.data_loader(Points(), 2)
    state = ctx.restore(into={"model": model, "optimizer": opt, "step": 0})
    function = {"step": state["step"], "at3": f_at3, "restored": _whole(model, opt), "draw": draw,
                "draw_again": torch.rand(4), "position": (position, loader.position)}
    set_rng_state(ctx._services.loaded.rank_state["rng"])
    _steps(ctx, model, opt, loader, range(3, 5))
    function |= {"at5": f_at5, "again5": _whole(model, opt)}
    ctx.close()
    torch.save({"builtin": builtin, "function": function, "events": events}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_fsdp_ranks_snapshot_their_own_slices_and_restore_bit_exact(tmp_path):
    from tests.test_fsdp import _equal
    from tests.test_function_fsdp import _spawn

    _spawn(_fsdp_snapshot_round_trip, 2, str(tmp_path / "out"))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        assert got["events"] == []
        b = got["builtin"]
        assert b["step"] == 3 and b["sharded"] and b["same_rng"]
        assert b["at3"]["model"] and b["at3"]["optim"]["state"]  # not empty: Adam's moments are there
        _equal(b["restored"], b["at3"], "builtin restored")
        _equal(b["again5"], b["at5"], "builtin trained on")
        assert not all(torch.equal(b["at3"]["model"][k], b["at5"]["model"][k]) for k in b["at3"]["model"])
        # this rank's slices only: about half of the whole state (plus the encoding's overhead)
        assert 0 < b["snapshot_bytes"] < 0.75 * b["whole_bytes"], (b["snapshot_bytes"], b["whole_bytes"])
        assert 0 < b["local_bytes"] < 0.75 * b["whole_bytes"] and b["over_kept"] == []
        (kind, _, message, step, data), = b["over"]
        assert (kind, step, data["reason"], data["bytes"]) == ("snapshot_skipped", 6, "limit", 3 * b["local_bytes"])
        assert "over checkpoint.memory_limit_mb" in message and "durable checkpoints only" in message
        f = got["function"]
        assert f["step"] == 2 and f["at3"]["model"]
        _equal(f["restored"], f["at3"], "function restored")
        assert torch.equal(f["draw"], f["draw_again"]) and f["position"][0] == f["position"][1] == 3
        _equal(f["again5"], f["at5"], "function trained on")


# --- on a 2-node Ray cluster ------------------------------------------------------------------


STEPS = 24


def config(tmp_path, data, *, kill_call=0, strategy="ddp", **checkpoint):
    return tiny_config(tmp_path, data, train={"max_steps": STEPS, "eval_every": 0}, parallelism={"strategy": strategy},
                       checkpoint=checkpoint, fault_tolerance={"max_restarts": 2, "backoff_s": 0.1},
                       model={"factory": "bench.memory_snapshots:killed_gpt",  # SIGKILLs its own rank once
                              "kwargs": {"kill_rank": 1 if kill_call else -1, "kill_call": kill_call}})


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:  # a node that fails to start (a very busy machine) must not leave the others running
        nodes = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        yield c, nodes
    finally:
        c.shutdown()  # only the raylets this fixture started


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, two_nodes):
    """The fault-free run: (per-rank losses, final weights)."""
    tmp = tmp_path_factory.mktemp("reference")
    run_cli("launch", str(config(tmp, tiny_data)), "--address", two_nodes[0].address, home=tmp / "home", check=True)
    return outcome(tmp / "home")


def outcome(home):
    from checkpointing.loader import load_latest

    run = cli_json("runs", home=home)[-1]["id"]
    losses = [[(p["step"], p["value"]) for p in cli_json("metrics", run, "--key", "train/loss", "--rank", str(r),
                                                           home=home)["points"]] for r in (0, 1)]
    loaded = load_latest(cli_json("checkpoints", run, home=home)["uri"])
    assert loaded is not None and loaded.step == STEPS
    if loaded.sharded:  # FSDP: the final weights, whole, from the DCP shards
        return losses, _whole_weights(loaded)
    return losses, loaded.model


def _whole_weights(loaded) -> dict:
    """A sharded (DCP) checkpoint's weights as whole tensors, read in this one process."""
    import io

    from checkpointing.format import SHARD_INDEX, _IndexUnpickler
    from checkpointing.loader import read_sharded

    index = _IndexUnpickler(io.BytesIO(loaded.shards[SHARD_INDEX])).load().state_dict_metadata
    state = {"model": {k.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
                       for k, m in index.items() if k.startswith("model.")}}
    read_sharded(loaded, state)
    return state["model"]


def assert_same_run(got, reference):
    (losses, weights), (ref_losses, ref_weights) = got, reference
    assert [s for s, _ in ref_losses[0]] == list(range(STEPS))
    assert losses == ref_losses  # every step, both ranks, bit for bit
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def events_of(home, kind):
    run = cli_json("runs", home=home)[-1]["id"]
    return [e for e in cli_json("show", run, home=home)["events"] if e["kind"] == kind]


@pytest.mark.ray
def test_sigkilled_rank_restores_from_its_peers_memory_bit_exact(tmp_path, home, tiny_data, two_nodes, reference):
    # durable checkpoints only at the end: whatever is restored comes from memory
    cfg = config(tmp_path, tiny_data, kill_call=15, every_steps=0, memory_every_steps=4)
    proc = run_cli("launch", str(cfg), "--address", two_nodes[0].address, home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("RESTART") == 1 and "from in-memory snapshots" in proc.stdout, proc.stdout

    (restore,) = events_of(home, "snapshot_restore")
    # killed in step 14: the snapshot of step 12, or of 8 if 12 was still on its way
    step = restore["data"]["step"]
    assert step in (8, 12) and restore["step"] == step and restore["data"]["durable_step"] is None
    workers = {n.node_id for n in two_nodes[1]}
    assert {n for held in restore["data"]["holders"].values() for n in held} <= workers and restore["data"]["nodes"]
    assert not events_of(home, "snapshot_fallback") and not events_of(home, "snapshot_skipped")

    from orchestrator.store import Store

    run = cli_json("runs", home=home)[-1]["id"]
    attempts = Store(home).attempts(run)
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[0]["cause"] == "died" and attempts[0]["rank"] == 1
    assert attempts[1]["resumed_from_step"] == step
    assert 0 <= attempts[0]["steps_lost"] <= 14 - step  # from step 0 without snapshots
    assert_same_run(outcome(home), reference)


@pytest.mark.ray
def test_snapshot_over_the_limit_falls_back_to_durable_checkpoints(tmp_path, home, tiny_data, two_nodes, reference):
    cfg = config(tmp_path, tiny_data, kill_call=15, every_steps=5, memory_every_steps=2, memory_limit_mb=1)
    proc = run_cli("launch", str(cfg), "--address", two_nodes[0].address, home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    skipped = events_of(home, "snapshot_skipped")
    assert sorted(e["rank"] for e in skipped) == [0, 0, 1, 1]  # each rank says so once per attempt
    for e in skipped:
        assert e["data"]["reason"] == "limit" and e["data"]["bytes"] > e["data"]["limit_bytes"] == MB
        assert "over checkpoint.memory_limit_mb=1" in e["message"]
    (fallback,) = events_of(home, "snapshot_fallback")
    assert "no snapshot survived" in fallback["data"]["why"]
    assert not events_of(home, "snapshot_restore")

    from orchestrator.store import Store

    attempts = Store(home).attempts(cli_json("runs", home=home)[-1]["id"])
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[1]["resumed_from_step"] in (None, 5, 10) and attempts[1]["resumed_from_step"] == fallback["data"]["durable_step"]
    assert_same_run(outcome(home), reference)


@pytest.mark.ray
def test_fsdp_sigkilled_rank_restores_its_shards_from_memory_bit_exact(tmp_path, home, tiny_data, two_nodes):
    """The built-in loop with parallelism.strategy=fsdp: each rank snapshots its own shards; rank 1
    is SIGKILLed, the group restores from the peers' memory (not a durable checkpoint: there is
    none before the end) and ends bit for bit where an uninterrupted FSDP run ends."""
    ref_home, ref_dir = tmp_path / "reference-home", tmp_path / "reference"
    ref_dir.mkdir()
    run_cli("launch", str(config(ref_dir, tiny_data, strategy="fsdp")), "--address", two_nodes[0].address,
            home=ref_home, check=True)
    reference = outcome(ref_home)
    cfg = config(tmp_path, tiny_data, kill_call=15, strategy="fsdp", every_steps=0, memory_every_steps=4)
    proc = run_cli("launch", str(cfg), "--address", two_nodes[0].address, home=home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("RESTART") == 1 and "from in-memory snapshots" in proc.stdout, proc.stdout
    (restore,) = events_of(home, "snapshot_restore")
    assert restore["data"]["step"] in (8, 12) and restore["data"]["durable_step"] is None
    assert not events_of(home, "snapshot_fallback") and not events_of(home, "snapshot_skipped")
    got = outcome(home)
    assert got[1] and "blocks.0.attn.qkv.weight" in got[1]  # whole weights, from both ranks' shards
    assert_same_run(got, reference)


@pytest.mark.ray
def test_a_function_restores_from_memory_through_ctx(tmp_path, home, tiny_data, two_nodes):
    def launch(name, kill_step, **checkpoint):
        cfg = tiny_config(tmp_path, tiny_data, run={"name": name, "seed": 3}, train={"max_steps": STEPS},
                          checkpoint=checkpoint, fault_tolerance={"max_restarts": 2, "backoff_s": 0.1},
                          entrypoint={"function": "tests.user_functions:regression",
                                      "kwargs": {"sigkill_at": kill_step}})
        proc = run_cli("launch", str(cfg), "--address", two_nodes[0].address, home=home)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        run = cli_json("runs", home=home)[-1]["id"]
        return run, [[(p["step"], p["value"]) for p in cli_json("metrics", run, "--key", "train/loss", "--rank", str(r),
                                                                 home=home)["points"]] for r in (0, 1)]

    _, reference = launch("reference", -1)
    run, got = launch("chaos", 13, every_steps=0, memory_every_steps=5)
    (restore,) = [e for e in cli_json("show", run, home=home)["events"] if e["kind"] == "snapshot_restore"]
    assert restore["data"]["step"] in (5, 10)  # killed in step 13 (14 done would be next)
    assert len(reference[0]) == STEPS and got == reference  # every step's loss, both ranks, bit for bit


@pytest.mark.ray
def test_a_lost_node_s_ranks_and_their_peers_restore_from_memory_bit_exact(tmp_path, home, tiny_data, two_nodes,
                                                                           reference):
    """Rank 1's node is removed mid-step. Rank 0's snapshots are on its own node and rank 1's on
    rank 0's node (its replica): the group restarts on a spare node from memory, not from the
    durable checkpoint, and ends bit for bit where the fault-free run ends. (Last in this module:
    it changes the cluster, leaving it two worker nodes.)"""
    import time

    from orchestrator.store import Store
    from tests.conftest import launch_in_background

    c, nodes = two_nodes
    spare = c.add_node(num_cpus=1)
    c.wait_for_nodes()
    at = tmp_path / "held-on"
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": STEPS, "eval_every": 0},
                      checkpoint={"every_steps": 0, "memory_every_steps": 4},
                      fault_tolerance={"max_restarts": 2, "backoff_s": 0.1},
                      model={"factory": "tests.user_models:held_gpt",  # the shape of the reference's model
                             "kwargs": {"hold_rank": 1, "hold_call": 15, "at_path": str(at)}})
    proc = launch_in_background(cfg, home=home, address=c.address, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # generous: a busy machine is slow
        while not at.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert at.exists(), "rank 1 never reached its held step"
        workers = {n.node_id: n for n in nodes + [spare]}  # rank 1 may have been placed on any of the three
        held_on = at.read_text()
        assert held_on in workers, (held_on, list(workers))
        victim = workers.pop(held_on)
        c.remove_node(victim)  # rank 1's node, with its keeper and rank 0's replica
        nodes[:] = workers.values()  # the fixture's cluster as it now is
        out, _ = proc.communicate(timeout=max(10, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert out.count("RESTART") == 1 and "from in-memory snapshots" in out, out
    (restore,) = events_of(home, "snapshot_restore")
    assert restore["data"]["step"] in (8, 12) and restore["data"]["durable_step"] is None  # held in step 14
    assert victim.node_id not in restore["data"]["nodes"] and restore["data"]["nodes"]
    assert not events_of(home, "snapshot_fallback")
    attempts = Store(home).attempts(cli_json("runs", home=home)[-1]["id"])
    assert [a["status"] for a in attempts] == ["failed", "completed"] and attempts[0]["rank"] == 1
    assert attempts[1]["resumed_from_step"] == restore["data"]["step"]
    assert_same_run(outcome(home), reference)
