"""Hang attribution when the host runs ahead of its collectives, as it does on CUDA: two real gloo
processes reduce gradients with `async_op=True` (distributed.async_collectives, the built-in loop's
test mode) and one rank hangs in forward, in backward, and after issuing its all-reduce but before
the optimizer waits for it. The watchdog's rules must name it each time from what the heartbeats
carry, and they could not if collectives were counted where they are issued."""

from __future__ import annotations

import copy
import queue
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator.hang.health import Health
from orchestrator.hang.rules import attribute
from tests.conftest import cli_json, run_cli, tiny_config
from tests.test_fsdp import _free_port, _join

HANGS = {2: "forward", 5: "backward", 8: "before_sync"}  # step -> where rank 1 hangs, in this order
STEPS = 11


def _ranks(rank: int, world: int, port: int, beats, release) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from orchestrator.parallel import AsyncGradReduce, wrap_model

    _join(rank, world, port)
    torch.manual_seed(0)
    model = wrap_model(torch.nn.Linear(8, 8), strategy="ddp", device=torch.device("cpu"), world_size=world,
                       async_grads=True)
    reference = DDP(copy.deepcopy(model))  # the same all-reduce as DDP does it, for the gradients' check
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reducer = AsyncGradReduce(model, world)
    health = Health(rank)
    done = threading.Event()

    def heartbeat():  # what hang/health.py's Heartbeat sends, without Ray
        while not done.wait(0.1):
            beats.put(health.snapshot())

    threading.Thread(target=heartbeat, daemon=True).start()
    gen = torch.Generator().manual_seed(rank)
    for step in range(STEPS):
        hang = HANGS.get(step) if rank == 1 else None
        gate = release[list(HANGS).index(step)] if hang else None
        health.phase = "forward"
        if hang == "forward":
            gate.wait(300)
        out = model(torch.randn(4, 8, generator=gen))
        if hang == "backward":  # blocks inside the autograd engine, before the gradients exist
            out.register_hook(lambda g, gate=gate: (gate.wait(300), g)[1])
        health.phase = "backward"
        optimizer.zero_grad(set_to_none=True)
        out.square().mean().backward()
        health.coll_entered += 1
        health.completes_later(reducer.issue())
        health.phase = "optimizer"
        if hang == "before_sync":
            gate.wait(300)
        reducer.wait()
        optimizer.step()
        health.step = step
    x = torch.randn(4, 8, generator=gen)
    optimizer.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    reducer.issue()
    reducer.wait()
    reference.module.load_state_dict(model.state_dict())
    reference(x).square().mean().backward()
    same = all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), reference.module.parameters(), strict=True))
    done.set()
    beats.put({"rank": rank, "grads_equal_ddp": same})


def test_a_rank_hung_anywhere_in_a_step_is_named_when_collectives_run_async():
    ctx = mp.get_context("spawn")
    beats, release = ctx.Queue(), [ctx.Event() for _ in HANGS]
    procs = mp.start_processes(_ranks, args=(2, _free_port(), beats, release), nprocs=2, start_method="spawn",
                               join=False)
    latest: dict[int, dict] = {}
    ends: dict[int, bool] = {}

    def drain(wait_s: float) -> None:
        try:
            b = beats.get(timeout=wait_s)
        except queue.Empty:
            return
        if "grads_equal_ddp" in b:
            ends[b["rank"]] = b["grads_equal_ddp"]
        else:
            latest[b["rank"]] = b

    try:
        for i, (step, where) in enumerate(HANGS.items()):
            phase = "optimizer" if where == "before_sync" else where
            deadline = time.monotonic() + 600  # spawn + torch import on a busy 2-core machine
            while time.monotonic() < deadline:
                drain(0.5)
                r0, r1 = latest.get(0), latest.get(1)
                if (r0 and r1 and r1["phase"] == phase and r1["step"] == step - 1
                        and r0["coll_entered"] == r1["coll_entered"] + 1 and r0["phase"] == "optimizer"
                        and r0["coll_completed"] == r0["coll_entered"] - 1 == r1["coll_completed"]):
                    break
            else:
                pytest.fail(f"hang in {where}: the beats never showed rank 0 waiting on rank 1: {latest}")
            beats_now = {r: dict(b) for r, b in latest.items()}
            verdict = attribute(beats_now, now=max(b["time"] for b in beats_now.values()), heartbeat_s=1000)
            assert (verdict["verdict"], verdict["culprits"]) == ("missing_collective", [1]), (where, verdict)
            assert f"rank 1 in {phase} at step {step - 1}" in verdict["reason"]
            # counted where issued instead, rank 0 would look done with a collective it is stuck in
            at_issue = {r: {**b, "coll_completed": b["coll_entered"]} for r, b in beats_now.items()}
            assert attribute(at_issue, now=verdict["ranks"][0]["time"], heartbeat_s=1000)["verdict"] == "undecided"
            release[i].set()
        deadline = time.monotonic() + 120
        while len(ends) < 2 and time.monotonic() < deadline:
            drain(0.5)
        assert ends == {0: True, 1: True}  # the async reduction averages gradients bit for bit as DDP does
        while not procs.join(timeout=1):
            drain(0)
    finally:
        for e in release:
            e.set()
        for p in procs.processes:
            if p.is_alive():
                p.kill()


@pytest.mark.ray
def test_async_collectives_run_names_a_rank_hung_in_forward(tmp_path, home, tiny_data, ray_address):
    """The built-in loop in the test mode: the other rank waits at the optimizer step, past the
    backward that issued the all-reduce; the stall still names the rank that never issued it."""
    cfg = tiny_config(tmp_path, tiny_data, train={"max_steps": 40, "eval_every": 0},
                      # node checks after a stall: tests/test_hang.py covers them; here they only cost time
                      hang={"timeout_s": 15, "heartbeat_s": 2.0, "node_checks": False},
                      fault_tolerance={"max_restarts": 0}, distributed={"timeout_s": 3600, "async_collectives": True},
                      model={"factory": "tests.user_models:hanging_gpt", "kwargs": {"hang_rank": 1, "hang_call": 8}})
    proc = run_cli("launch", str(cfg), "--address", ray_address, home=home)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_id = cli_json("runs", home=home)[-1]["id"]
    (d,) = cli_json("diagnose", run_id, home=home)["events"]
    assert (d["kind"], d["verdict"], d["culprits"], d["phase"]) == ("stall", "missing_collective", [1], "forward")
    waiter = d["evidence"]["0"]
    assert waiter["phase"] == "optimizer" and waiter["coll_entered"] == waiter["coll_completed"] + 1


@pytest.mark.parametrize("section", [{"parallelism": {"strategy": "fsdp"}},
                                     {"entrypoint": {"script": "train.py"}}])
def test_async_collectives_outside_the_built_in_ddp_loop_is_refused_in_one_line(section):
    from common.errors import ConfigError
    from orchestrator.config import config_from_dict

    with pytest.raises(ConfigError, match=r"^distributed.async_collectives=true: a test mode of the built-in loop"):
        config_from_dict({"data": {"uri": "x", "global_batch_size": 8}, "distributed": {"async_collectives": True},
                          **section})
