"""FSDP2: sharded checkpoints (DCP) through our writer, exact round trips, resharding, and the
strategy switch; first in gloo process groups of our own (no Ray), then through the real CLI.

Bit-exactness holds on one world size. Across world sizes FSDP is close, not exact: each rank's
slice of the batch and the order of the gradient reduction change, so float sums round
differently (DDP is the same there; the data order itself does not change).
"""

from __future__ import annotations

import pickle
import socket
from multiprocessing.managers import BaseManager

import fsspec
import pytest
import torch
import torch.multiprocessing as mp

from actors.checkpoint_coordinator import CheckpointCoordinator
from checkpointing import format
from checkpointing.config import CheckpointConfig
from checkpointing.errors import CorruptCheckpoint
from checkpointing.loader import load_latest, read_sharded
from tests.conftest import cli_json, run_cli, tiny_config

CK = CheckpointConfig(start_jitter_s=0.0, backoff_s=0.001, max_backoff_s=0.01, retries=2, commit_timeout_s=120)


# --- the harness: ranks in processes of their own, one coordinator they all call ---------------


class _Manager(BaseManager):
    pass


_COORDINATOR: list = []  # in the manager's process: the one coordinator every rank talks to


def _coordinator(*args, **kwargs):
    if args or kwargs:
        _COORDINATOR.append(CheckpointCoordinator(*args, **kwargs))
    return _COORDINATOR[-1]


_Manager.register("Coordinator", _coordinator)


class _Client:
    """The writer's client interface over a multiprocessing proxy of the coordinator."""

    def __init__(self, proxy):
        self.proxy = proxy

    def call(self, method: str, *args, **kwargs):
        return getattr(self.proxy, method)(*args, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, start_method="spawn", join=True)


def _join(rank: int, world: int, port: int) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=120))


def _build(seed: int, strategy: str, world: int):
    from orchestrator.config import Config
    from orchestrator.gpt import GPT
    from orchestrator.gpt_function import make_optimizer
    from orchestrator.parallel import wrap_model

    torch.manual_seed(seed)
    model = GPT(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32)
    model = wrap_model(model, strategy=strategy, device=torch.device("cpu"), world_size=world)
    inner = getattr(model, "module", model)
    return model, inner, make_optimizer(inner, Config())


def _train(model, optimizer, steps: int, *, rank: int, world: int, accum: int = 1) -> None:
    from torch.nn import functional as F

    from orchestrator.parallel import grad_sync

    gen = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        batch = torch.randint(0, 64, (8, 17), generator=gen).chunk(world)[rank]
        optimizer.zero_grad(set_to_none=True)
        for i, micro in enumerate(batch.chunk(accum)):
            with grad_sync(model, i == accum - 1):
                logits = model(micro[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, 64), micro[:, 1:].reshape(-1)) / accum
                loss.backward()
        optimizer.step()


def _whole(inner, optimizer) -> dict:
    """Model and optimizer state as whole tensors, keyed by name (the same on every strategy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(inner, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return format.to_host({"model": msd, "optim": osd})  # copies: training on must not change them


def _sampler():
    from dataloading.sampler import GlobalSampler

    return GlobalSampler(64, 8, seed=0)


def _checkpointer(root: str, rank: int, world: int, client):
    from checkpointing.writer import Checkpointer

    return Checkpointer(fs=fsspec.filesystem("file"), root=root, client=client, rank=rank, world_size=world,
                        run_id="run-1", config={"run": {"seed": 0}}, cfg=CK, poll_s=0.01, warn=print)


def _restore(root: str, rank: int, world: int, inner, optimizer) -> int:
    from orchestrator.restore import restore_state

    loaded = load_latest(root, rank=rank)
    return restore_state(loaded, model=inner, optimizer=optimizer, sampler=_sampler(), seed=0, rank=rank,
                         world_size=world)


def _save_then_restore(rank: int, world: int, port: int, root: str, address, out: str) -> None:
    """Train 3 steps, checkpoint (sharded), then restore into a differently initialised model."""
    import torch.distributed as dist

    _join(rank, world, port)
    manager = _Manager(address=address, authkey=b"fsdp-test")
    manager.connect()
    model, inner, opt = _build(0, "fsdp", world)
    _train(model, opt, 3, rank=rank, world=world)
    ck = _checkpointer(root, rank, world, _Client(manager.Coordinator()))
    ck.save(3, model=inner, optimizer=opt, sampler_state=_sampler().state_dict(3))
    result = ck.close()[-1]
    before = _whole(inner, opt)
    dist.barrier()  # rank 0 has committed
    model2, inner2, opt2 = _build(99, "fsdp", world)
    step = _restore(root, rank, world, inner2, opt2)
    after = _whole(inner2, opt2)
    _train(model2, opt2, 1, rank=rank, world=world)  # and it trains on from there
    if rank == 0:
        torch.save({"before": before, "after": after, "step": step, "status": result.status,
                    "blocked_s": result.blocked_s}, out)
    dist.destroy_process_group()


def _restore_into(rank: int, world: int, port: int, root: str, strategy: str, out: str) -> None:
    import torch.distributed as dist

    _join(rank, world, port)
    model, inner, opt = _build(99, strategy, world)
    step = _restore(root, rank, world, inner, opt)
    whole = _whole(inner, opt)
    if rank == 0:
        torch.save({"after": whole, "step": step}, out)
    dist.destroy_process_group()


def _equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.fixture
def coordinator(tmp_path):
    def start(world: int):
        manager = _Manager(address=("127.0.0.1", 0), authkey=b"fsdp-test")
        manager.start()
        coord = manager.Coordinator("run-1", str(tmp_path / "ck"), world, max_concurrent_writes=2, per_node_writes=2,
                                    slot_lease_s=60)
        started.append(manager)
        return manager.address, coord

    started: list = []
    yield start
    for manager in started:
        manager.shutdown()


def test_sharded_round_trip_is_exact_and_loads_whole_anywhere(tmp_path, coordinator):
    """2 FSDP ranks save through our writer (slots, manifest, commit); a fresh 2-rank FSDP model
    restored from it has exactly the saved weights and optimizer state; so does a plain model in a
    single process (sharded -> whole: what a DDP run does), and a 4 -> 2 style reslice to 1."""
    root, out = str(tmp_path / "ck"), str(tmp_path / "out.pt")
    address, coord = coordinator(2)
    _spawn(_save_then_restore, 2, root, address, out)
    got = torch.load(out, weights_only=False)
    assert got["status"] == "committed" and got["step"] == 3
    _equal(got["before"], got["after"])

    ck = load_latest(root, rank=0)
    assert ck.sharded and ck.model is None and ck.optimizer is None and ck.meta["format"] == 2
    kinds = {f["name"]: f["kind"] for f in ck.manifest["files"]}
    assert kinds == {"state.shard_00000.distcp": "shard", "state.shard_00001.distcp": "shard",
                     "state.metadata": "shard_index", "meta.pt": "replicated", "rank_00000.pt": "rank",
                     "rank_00001.pt": "rank"}
    assert ck.manifest["format"] == 2 and [o["status"] for o in coord.history()] == ["committed"]

    _, inner, opt = _build(7, "ddp", 1)  # one process, no process group: the whole tensors
    assert _restore(root, 0, 1, inner, opt) == 3
    _equal(got["before"], _whole(inner, opt))


def test_replicated_checkpoint_loads_into_fsdp_ranks(tmp_path):
    """A DDP (replicated, format 1) checkpoint resumes under parallelism.strategy=fsdp: each rank
    keeps its slice of the same weights and optimizer state."""
    from actors.checkpoint_coordinator import CheckpointCoordinator
    from checkpointing.client import LocalClient

    root, out = str(tmp_path / "ck"), str(tmp_path / "out.pt")
    model, inner, opt = _build(0, "ddp", 1)
    _train(model, opt, 3, rank=0, world=1)
    coord = CheckpointCoordinator("run-1", root, 1, max_concurrent_writes=1, per_node_writes=1, slot_lease_s=60)
    ck = _checkpointer(root, 0, 1, LocalClient(coord))
    ck.save(3, model=inner, optimizer=opt, sampler_state=_sampler().state_dict(3))
    assert ck.close()[-1].status == "committed"
    saved = load_latest(root)
    assert not saved.sharded and saved.meta["format"] == 1 and saved.manifest["format"] == 1
    _spawn(_restore_into, 2, root, "fsdp", out)
    got = torch.load(out, weights_only=False)
    assert got["step"] == 3
    _equal(_whole(inner, opt), got["after"])


def test_shard_index_is_never_unpickled_freely(tmp_path):
    """DCP's index is a pickle: ours reads it with an allow-list, so a crafted one is corrupt,
    not code run."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    files = {format.SHARD_INDEX: pickle.dumps(Evil()), format.shard_file(0): b""}
    loaded = type("L", (), {"shards": files, "step": 5, "uri": "x"})()
    with pytest.raises(CorruptCheckpoint, match=r"\.system is not allowed in a checkpoint index"):
        read_sharded(loaded, {"model": {"w": torch.zeros(2)}})


# --- through the CLI on the session's Ray cluster ----------------------------------------------


def _losses(run_id: str, home, rank: int) -> dict[int, float]:
    pts = cli_json("metrics", run_id, "--key", "train/loss", "--rank", str(rank), home=home)["points"]
    return {p["step"]: p["value"] for p in pts}


@pytest.mark.ray
def test_fsdp_four_ranks_checkpoint_resume_on_two(tmp_path, home, tiny_data, ray_address):
    """4 FSDP ranks train 12 steps with checkpoints at 6 and 12; as if it had stopped after step
    6 (its step-12 checkpoint removed), `resume RUN scaling.num_workers=2` reads the 4-rank shards
    on 2 ranks and goes on; its losses at steps 6..11 are close to the 4-rank run's. Each rank's
    loss is over its slice of the global batch: 2-rank rank 0 holds 4-rank ranks 0 and 1's."""
    import shutil

    ck_dir = tmp_path / "ck"
    cfg = tiny_config(tmp_path, tiny_data, scaling={"num_workers": 4, "cpus_per_worker": 1},
                      parallelism={"strategy": "fsdp"}, train={"max_steps": 12, "eval_every": 0},
                      checkpoint={"uri": str(ck_dir), "every_steps": 6})
    run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=400, check=True)
    (run,) = cli_json("runs", home=home)
    four = [_losses(run["id"], home, rank) for rank in range(4)]
    assert all(sorted(series) == list(range(12)) for series in four)
    ckpts = cli_json("checkpoints", run["id"], home=home)["checkpoints"]
    assert [c["step"] for c in ckpts if c["status"] == "committed"] == [6, 12]
    shards = sorted(p.name for p in (ck_dir / "step_00000006").iterdir() if "shard" in p.name)
    assert shards == [f"state.shard_{r:05d}.distcp" for r in range(4)]

    shutil.rmtree(ck_dir / "step_00000012")
    proc = run_cli("resume", run["id"], "scaling.num_workers=2", "--address", ray_address, home=home, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rendezvous done: 2 ranks" in proc.stdout
    two = [_losses(run["id"], home, rank) for rank in range(2)]
    for step in range(6, 12):
        for rank in range(2):
            expected = (four[2 * rank][step] + four[2 * rank + 1][step]) / 2
            assert two[rank][step] == pytest.approx(expected, rel=2e-3), (step, rank, two[rank][step], expected)
    assert two[0][6] == pytest.approx((four[0][6] + four[1][6]) / 2, rel=1e-5)  # the restored weights themselves


@pytest.mark.ray
def test_fsdp_fork_on_the_same_world_size_is_bit_exact(tmp_path, home, tiny_data, ray_address):
    """Restore on the same world size is exact: a fork of a 2-rank FSDP run at step 4 logs the
    very losses and gradient norms the parent logged from there (weights, Adam moments, data
    position and RNG streams all came back)."""
    cfg = tiny_config(tmp_path, tiny_data, parallelism={"strategy": "fsdp"}, train={"max_steps": 8, "eval_every": 0},
                      checkpoint={"uri": str(tmp_path / "ck"), "every_steps": 4})
    run_cli("launch", str(cfg), "--address", ray_address, home=home, timeout=300, check=True)
    (parent,) = cli_json("runs", home=home)
    run_cli("fork", parent["id"], "--step", "4", "--address", ray_address, home=home, timeout=300, check=True)
    child = next(r for r in cli_json("runs", home=home) if r["id"] != parent["id"])

    for key in ("train/loss", "train/grad_norm"):
        for rank in ("0", "1"):
            def series(run_id, key=key, rank=rank):
                pts = cli_json("metrics", run_id, "--key", key, "--rank", rank, home=home)["points"]
                return {p["step"]: p["value"] for p in pts if p["step"] >= 4}
            assert series(child["id"]) == series(parent["id"]), (key, rank)


@pytest.mark.ray
def test_fsdp_bf16_recipe_runs(tmp_path, home, tiny_data, ray_address):
    """configs/fsdp_bf16.yaml as shipped (the demo GPT, FSDP, bf16, 2 micro-batches), on the tiny
    data for a few steps: it trains and writes a sharded checkpoint."""
    from tests.conftest import REPO

    proc = run_cli("launch", str(REPO / "configs" / "fsdp_bf16.yaml"), "--address", ray_address,
                   f"data.uri={tiny_data}", "train.max_steps=4", "train.eval_every=2", "train.eval_batches=1",
                   f"checkpoint.uri={tmp_path / 'ck'}", "telemetry.system_every_s=0", home=home, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = cli_json("runs", home=home)
    config = cli_json("show", run["id"], home=home)["config"]
    assert config["parallelism"]["strategy"] == "fsdp" and config["train"]["precision"] == "bf16"
    ck = load_latest(str(tmp_path / "ck"))
    assert ck.step == 4 and ck.sharded and len(ck.shards) == 3  # two shards and their index
