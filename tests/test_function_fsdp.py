"""ctx.save / ctx.restore under parallelism.strategy=fsdp: a function's sharded state (DTensors)
goes through DCP and our writer (write slots, manifest), and comes back in place through
ctx.restore(into=...), on the same world size bit-exact, and on another one (4 -> 2) with the very
same weights, optimizer state, loader position and RNG streams.

The 4 -> 2 path runs in gloo process groups of our own (no Ray, like tests/test_fsdp.py); the
restarts (from the durable sharded checkpoint, and from in-memory snapshots of each rank's shards)
run through the real CLI on the session's Ray cluster.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import fsspec
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from checkpointing.loader import load_latest
from common.errors import UserError
from tests.conftest import cli_json, run_cli, tiny_config
from tests.test_fsdp import CK, _Client, _equal, _free_port, _join, _Manager, coordinator  # noqa: F401 (coordinator: a fixture)
from tests.user_functions import Points


class Blocks(nn.Module):
    """Two blocks in a ModuleList (each its own FSDP unit), dropout (the RNG must resume) and a
    head that stays in the root unit."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4 if i == 0 else 16, 16), nn.ReLU(), nn.Dropout(0.1))
                                    for i in range(2))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fsdp_regression(ctx, *, batch_size: int = 4, lr: float = 0.01, sigkill_at: int | None = None,
                    once_committed: str | None = None):
    """A user's FSDP function: saves its state dicts through ctx, restores them in place.
    `sigkill_at`: rank 1 SIGKILLs itself at that step of the first attempt (a lost process), once
    the file `once_committed` exists (a checkpoint's manifest: uploads are asynchronous)."""
    torch.use_deterministic_algorithms(True)
    model = ctx.prepare(Blocks())
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = ctx.data_loader(Points(), batch_size)
    state = ctx.restore(into={"model": model, "optimizer": opt, "step": 0})
    step = 0 if state is None else state["step"] + 1
    while step < ctx.max_steps:
        for x, y in loader:
            if step >= ctx.max_steps:
                break
            if step == sigkill_at and ctx.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                deadline = time.monotonic() + 120
                while once_committed and not os.path.exists(once_committed) and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            loss = nn.functional.mse_loss(model(x), y) + torch.randn(()).item() * 1e-3
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctx.log({"train/loss": loss.item()}, step)
            ctx.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, step)
            step += 1


# --- 4 ranks save, 2 ranks restore: the ctx in processes of our own -----------------------------


def _spawn(fn, world: int, *args) -> None:
    """Ranks forked from a server that imported torch and this module once: on a busy machine
    each spawned interpreter would spend seconds importing them again."""
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, start_method="forkserver", join=True)



class _Sender:
    """The metric sender's interface (ctx.log, and the checkpointer's timings), dropping points."""

    def __call__(self, *args, **kwargs):
        pass

    def log(self, *args, **kwargs):
        pass

    def flush(self):
        pass


def _context(rank: int, world: int, *, loaded=None, checkpointer=None):
    from orchestrator.config import config_from_dict
    from orchestrator.context import TrainContext
    from orchestrator.hang.health import Health

    cfg = config_from_dict({"run": {"seed": 3}, "scaling": {"num_workers": world}, "train": {"max_steps": 10},
                            "parallelism": {"strategy": "fsdp"}, "checkpoint": {"every_steps": 3}})
    member = SimpleNamespace(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    services = SimpleNamespace(member=member, sender=_Sender(), health=Health(rank), checkpointer=checkpointer,
                               loaded=loaded, snapshots=None)
    return TrainContext(cfg, services)


def _whole(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from checkpointing import format

    # whole tensors on every rank (cpu_offload would keep them on rank 0 only)
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return format.to_host({"model": msd, "optim": osd})


def _steps(ctx, model, opt, loader, steps: range) -> None:
    batches = iter(loader)
    for step in steps:
        x, y = next(batches)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, step)


def _save_on_four(rank: int, world: int, port: int, root: str, address, out: str) -> None:
    """3 steps on `world` FSDP ranks, saved through ctx (due at 3 steps done, every_steps=3)."""
    from checkpointing.writer import Checkpointer

    _join(rank, world, port)
    manager = _Manager(address=address, authkey=b"fsdp-test")
    manager.connect()
    ck = Checkpointer(fs=fsspec.filesystem("file"), root=root, client=_Client(manager.Coordinator()), rank=rank,
                      world_size=world, run_id="run-1", config={"run": {"seed": 3}},
                      cfg=dataclasses.replace(CK, every_steps=3), poll_s=0.01, warn=print)
    ctx = _context(rank, world, checkpointer=ck)
    model = ctx.prepare(Blocks())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = ctx.data_loader(Points(), 2)
    _steps(ctx, model, opt, loader, range(3))
    ctx.close()  # the ranks' stop agreement in flight, as run_function does
    status = ck.close()[-1].status
    torch.save({"whole": _whole(model, opt), "status": status, "draw": torch.rand(4), "position": loader.position},
               f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _restore_on_two(rank: int, world: int, port: int, root: str, out: str) -> None:
    _join(rank, world, port)
    ctx = _context(rank, world, loaded=load_latest(root, rank=rank))
    torch.manual_seed(99)  # other initial weights than the saving run's: the restore must replace them
    model = ctx.prepare(Blocks())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = ctx.data_loader(Points(), 4)
    errors = []
    for into in (None, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}):
        try:
            ctx.restore(into=into)
        except UserError as e:
            errors.append(str(e))
    state = ctx.restore(into={"model": model, "optimizer": opt, "step": 0})
    result = {"whole": _whole(model, opt), "step": state["step"], "draw": torch.rand(4), "position": loader.position,
              "errors": errors, "start_step": ctx.start_step}
    _steps(ctx, model, opt, loader, range(3, 4))  # and it trains on from there
    ctx.close()
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_fsdp_state_saved_on_four_ranks_restores_on_two(tmp_path, coordinator):  # noqa: F811 (the fixture)
    """Saved by 4 FSDP ranks through ctx.save (DCP shards, write slots, manifest), restored by 2
    through ctx.restore(into=...): weights and Adam moments equal to the 4-rank run's, bit for
    bit; the loader's position and ranks 0 and 1's RNG streams are back. ctx.restore() without
    into= and a template lacking the optimizer's state are one-line UserErrors. The same
    checkpoint loads whole into one process without FSDP."""
    root, out = str(tmp_path / "ck"), str(tmp_path / "out")
    address, coord = coordinator(4)
    _spawn(_save_on_four, 4, root, address, out)
    four = [torch.load(f"{out}.{r}", weights_only=False) for r in range(4)]
    assert [f["status"] for f in four] == ["committed", "uploaded", "uploaded", "uploaded"]
    assert [o["status"] for o in coord.history()] == ["committed"]
    ck = load_latest(root)
    assert ck.step == 3 and ck.sharded and ck.model is None
    kinds = sorted(f["kind"] for f in ck.manifest["files"])
    assert kinds == sorted(["rank"] * 4 + ["shard"] * 4 + ["replicated", "shard_index"])

    _spawn(_restore_on_two, 2, root, str(tmp_path / "two"))
    two = [torch.load(f"{tmp_path / 'two'}.{r}", weights_only=False) for r in range(2)]
    saved = four[0]["whole"]
    assert saved["model"] and saved["optim"]["state"]  # not empty: the comparisons below mean something
    for rank in (1, 2, 3):
        _equal(saved, four[rank]["whole"], f"4-rank rank {rank}")
    for rank, got in enumerate(two):
        _equal(saved, got["whole"], f"rank {rank}")
        assert got["step"] == 2 and got["start_step"] == 3
        assert got["position"] == four[rank]["position"] == 3  # global batches: the same on any world size
        assert torch.equal(got["draw"], four[rank]["draw"])  # rank r's RNG stream goes on
        no_into, fresh_optimizer = got["errors"]
        assert "pass a template" in no_into and "into=" in no_into and "\n" not in no_into
        assert "optimizer.state.0." in fresh_optimizer and "which into= lacks" in fresh_optimizer

    ctx = _context(0, 1, loaded=load_latest(root))  # one process, no process group: whole tensors
    model = ctx.prepare(Blocks())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for into, expected in (({"model": model, "optimizer": opt, "step": 0, "extra": 1}, "does not fit"),
                           ({"model": nn.Linear(4, 1), "optimizer": opt, "step": 0}, "does not fit"),
                           ([model], "into= must be a dict")):
        with pytest.raises(UserError, match=expected) as bad:
            ctx.restore(into=into)
        assert "\n" not in str(bad.value)
    state = ctx.restore(into={"model": model, "optimizer": opt, "step": 0})
    assert state["step"] == 2
    _equal(saved["model"], model.state_dict(), "whole model")


def test_replicated_state_restores_into_modules_too(tmp_path):
    """Without FSDP (one rank) the state is replicated: ctx.restore() returns it, and with into=
    it also loads the modules and optimizers there."""
    from actors.checkpoint_coordinator import CheckpointCoordinator
    from checkpointing.client import LocalClient
    from checkpointing.writer import Checkpointer

    root = str(tmp_path / "ck")
    coord = CheckpointCoordinator("run-1", root, 1, max_concurrent_writes=1, per_node_writes=1, slot_lease_s=60)
    ck = Checkpointer(fs=fsspec.filesystem("file"), root=root, client=LocalClient(coord), rank=0, world_size=1,
                      run_id="run-1", config={}, cfg=dataclasses.replace(CK, every_steps=3), poll_s=0.01, warn=print)
    ctx = _context(0, 1, checkpointer=ck)
    model = ctx.prepare(Blocks())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _steps(ctx, model, opt, ctx.data_loader(Points(), 2), range(3))
    assert ck.close()[-1].status == "committed" and not load_latest(root).sharded

    ctx = _context(0, 1, loaded=load_latest(root))
    model2 = ctx.prepare(Blocks())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    state = ctx.restore(into={"model": model2, "optimizer": opt2, "step": 0})
    assert state["step"] == 2 and opt.state_dict()["state"]
    _equal(_whole(model, opt), _whole(model2, opt2))
    with pytest.raises(UserError, match="has nothing there"):
        ctx.restore(into={"weights": model2})


# --- through the CLI: a SIGKILLed FSDP function ends bit-identical ------------------------------


def _losses(home, run_id: str, rank: int) -> list[tuple[int, float]]:
    pts = cli_json("metrics", run_id, "--key", "train/loss", "--rank", str(rank), home=home)["points"]
    return [(p["step"], p["value"]) for p in pts]


@pytest.mark.ray
def test_fsdp_function_sigkilled_resumes_bit_identical(tmp_path, home, tiny_data, ray_address):
    """Rank 1 of a 2-rank FSDP function run SIGKILLs itself at step 7 of its first attempt; the
    group restarts from the sharded checkpoint of step 4 and ends with every step's loss, on both
    ranks, bit-identical to an uninterrupted run."""
    steps = 10

    def config(name: str, **kwargs):
        path = tiny_config(tmp_path, tiny_data, run={"name": name, "seed": 1}, train={"max_steps": steps},
                           parallelism={"strategy": "fsdp"},
                           checkpoint={"every_steps": 4, "uri": str(tmp_path / f"ck-{name}")},
                           fault_tolerance={"max_restarts": 2, "backoff_s": 0.2},
                           telemetry={"system_every_s": 0},
                           entrypoint={"function": "tests.test_function_fsdp:fsdp_regression", "kwargs": kwargs})
        return path.rename(tmp_path / f"{name}.yaml")

    manifest = tmp_path / "ck-chaos" / "step_00000004" / "MANIFEST.json"
    reference_cfg, chaos_cfg = config("reference"), config("chaos", sigkill_at=7, once_committed=str(manifest))
    with ThreadPoolExecutor(1) as pool:  # the reference side by side (2 of the session cluster's 4 CPUs each)
        reference_done = pool.submit(run_cli, "launch", str(reference_cfg), "--address", ray_address, home=home,
                                     check=True)
        proc = run_cli("launch", str(chaos_cfg), "--address", ray_address, home=home)
        reference_done.result()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("RESTART") == 1, proc.stdout
    assert "resuming at step 4" in proc.stdout, proc.stdout  # from the sharded checkpoint, not from scratch
    runs = {r["name"]: r["id"] for r in cli_json("runs", home=home)}
    ck = load_latest(str(tmp_path / "ck-chaos"))
    assert ck.step == steps and ck.sharded  # the last one, sharded like the one it resumed from
    for rank in (0, 1):
        reference, chaos = _losses(home, runs["reference"], rank), _losses(home, runs["chaos"], rank)
        assert [s for s, _ in reference] == list(range(steps))
        assert chaos == reference, rank  # every step's loss, bit for bit


@pytest.mark.ray
def test_fsdp_function_restores_its_shards_from_memory_bit_identical(tmp_path, home, tiny_data, ray_address):
    """The same FSDP function with checkpoint.memory_every_steps=3 and no durable checkpoint before
    the end: rank 1 SIGKILLs itself at step 7, the group restores every rank's own shards from
    memory through ctx.restore(into=...), and every step's loss matches an uninterrupted run."""
    steps = 10

    def config(name: str, **kwargs):
        path = tiny_config(tmp_path, tiny_data, run={"name": name, "seed": 1}, train={"max_steps": steps},
                           parallelism={"strategy": "fsdp"},
                           checkpoint={"every_steps": 0, "memory_every_steps": 3, "uri": str(tmp_path / f"ck-{name}")},
                           fault_tolerance={"max_restarts": 2, "backoff_s": 0.2}, telemetry={"system_every_s": 0},
                           entrypoint={"function": "tests.test_function_fsdp:fsdp_regression", "kwargs": kwargs})
        return path.rename(tmp_path / f"{name}.yaml")

    reference_cfg, chaos_cfg = config("reference"), config("chaos", sigkill_at=7)
    with ThreadPoolExecutor(1) as pool:  # side by side, as above
        reference_done = pool.submit(run_cli, "launch", str(reference_cfg), "--address", ray_address, home=home,
                                     check=True)
        proc = run_cli("launch", str(chaos_cfg), "--address", ray_address, home=home)
        reference_done.result()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("RESTART") == 1 and "from in-memory snapshots" in proc.stdout, proc.stdout
    runs = {r["name"]: r["id"] for r in cli_json("runs", home=home)}
    events = cli_json("show", runs["chaos"], home=home)["events"]
    (restore,) = [e for e in events if e["kind"] == "snapshot_restore"]
    assert restore["data"]["step"] in (3, 6) and restore["data"]["durable_step"] is None
    assert not [e for e in events if e["kind"] in ("snapshot_fallback", "snapshot_skipped")]
    for rank in (0, 1):
        reference, chaos = _losses(home, runs["reference"], rank), _losses(home, runs["chaos"], rank)
        assert [s for s, _ in reference] == list(range(steps))
        assert chaos == reference, rank  # every step's loss, bit for bit
