"""In-memory snapshots (checkpoint.memory_every_steps): what they cost the training step, and
what they save when a rank dies. JSON on the last stdout line; progress on stderr.

1. Stall, in one process on the demo GPT (configs/demo.yaml's model, a rank's batch of the demo
   run, 1 torch thread), against a keeper actor of a local Ray cluster this script starts:
   - ours: the rank-side time of Snapshotter.take (the copy to host memory; encoding and sending
     run in a background thread), and the training steps that overlap that background work;
   - peers on the same state, same process: our durable Checkpointer.save (its blocked time, to a
     local folder) and a synchronous torch.save of model + optimizer on the training thread (a
     snapshot without the background thread);
   - restoring the state: fetched from the keeper and decoded, against load_latest of the durable
     checkpoint of the same step from the local folder (both verified / weights_only).
1b. Stall under parallelism.strategy ddp and fsdp, side by side on the same work: 2 gloo ranks
   (spawned processes, 1 torch thread each) training the demo GPT on the demo run's per-rank
   batch, a snapshot every --every steps; FSDP ranks copy only their own shards.
2. Steps lost per failure, on a 2-node ray.cluster_utils.Cluster, tiny GPT: the same run, one rank
   SIGKILLed at the same step, with durable checkpoints every --durable-every steps only, and with
   snapshots every --memory-every steps as well; steps lost and recovery time from the store's
   attempts, and whether both end with the same final loss (bit for bit).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib is beside us (also when imported by workers)
from benchlib import git_state, machine  # noqa: E402

from orchestrator.gpt import GPT  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ORCH = [sys.executable, "-m", "orchestrator.cli"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- 1. the stall -------------------------------------------------------------------------------


def stall(steps: int, every: int) -> dict:
    import fsspec
    import ray
    import yaml

    from actors.checkpoint_coordinator import CheckpointCoordinator
    from actors.snapshot_keeper import SnapshotKeeper
    from checkpointing import format
    from checkpointing.client import LocalClient, RayClient
    from checkpointing.config import CheckpointConfig
    from checkpointing.loader import load_latest
    from checkpointing.memory import Snapshotter, as_loaded
    from checkpointing.writer import Checkpointer
    from orchestrator.config import config_from_dict
    from orchestrator.gpt import build_model
    from orchestrator.gpt_function import loss_of, make_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = config_from_dict(yaml.safe_load(open(ROOT / "configs/demo.yaml")))
    model = build_model(cfg.model, vocab_size=256, block_size=256)
    opt = make_optimizer(model, cfg)
    batch = torch.randint(0, 256, (cfg.data.global_batch_size // cfg.scaling.num_workers, 257))

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    keeper = ray.remote(SnapshotKeeper).options(num_cpus=0).remote("bench-node")
    snap = Snapshotter(every_steps=every, limit_bytes=2**40, rank=0, world_size=1, run_id="bench", attempt=0,
                       keepers=[("", RayClient(keeper))], report=lambda *a: log(f"event {a[:3]}"))
    folder = tempfile.mkdtemp(prefix="bench-snap-")
    ckpt_cfg = CheckpointConfig(uri=folder, start_jitter_s=0.0)
    coordinator = CheckpointCoordinator("bench", folder, 1, max_concurrent_writes=4, per_node_writes=4, slot_lease_s=60)
    durable = Checkpointer(fs=fsspec.filesystem("file"), root=folder, client=LocalClient(coordinator), rank=0,
                           world_size=1, run_id="bench", config={}, cfg=ckpt_cfg)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        return time.perf_counter() - t

    plain, overlapped, durable_overlapped, snap_s, durable_s, sync_s = [], [], [], [], [], []
    for _ in range(5):  # warm-up
        step()
    modes = ("ours", "durable", "sync")  # in turn, one per snapshot point, so each runs on a quiet thread
    for i in range(1, steps + 1):
        took = step()
        if snap.sender.busy:
            overlapped.append(took)
        elif durable.uploader.busy:
            durable_overlapped.append(took)
        else:
            plain.append(took)
        if i % every:
            continue
        mode = modes[(i // every - 1) % len(modes)]
        t = time.perf_counter()
        if mode == "ours":
            snap.take(i, model=model, optimizer=opt, sampler_state={"samples_consumed": i})
            snap_s.append(snap.blocked[-1])
        elif mode == "durable":
            durable.save(i, model=model, optimizer=opt, sampler_state={"samples_consumed": i})
            durable_s.append(time.perf_counter() - t)
        else:  # a snapshot serialized on the training thread
            format.encode({"model": model.state_dict(), "optim": opt.state_dict()})
            sync_s.append(time.perf_counter() - t)
    # the same state both ways, then restored both ways
    final = steps + 1
    step()
    snap.take(final, model=model, optimizer=opt, sampler_state={"samples_consumed": final})
    durable.save(final, model=model, optimizer=opt, sampler_state={"samples_consumed": final})
    snap.close()
    durable.close()
    t = time.perf_counter()
    from_memory = as_loaded(ray.get(keeper.get.remote(0, final)), where="memory")
    restore_memory = time.perf_counter() - t
    t = time.perf_counter()
    from_disk = load_latest(folder)
    restore_durable = time.perf_counter() - t
    same = (from_disk is not None and from_disk.step == from_memory.step == final
            and all(torch.equal(from_disk.model[k], from_memory.model[k]) for k in from_memory.model))
    nbytes = ray.get(keeper.inventory.remote())[-1]["bytes"]
    ray.shutdown()
    med = statistics.median
    step_s = med(plain)
    return {"params": sum(p.numel() for p in model.parameters()), "snapshot_bytes": nbytes, "every": every,
            "snapshots": len(snap_s), "step_s_median": round(step_s, 4),
            "snapshot_stall_s_median": round(med(snap_s), 5),
            "snapshot_stall_pct_of_step": round(100 * med(snap_s) / step_s, 2),
            "overlapped_step_s_median": round(med(overlapped), 4) if overlapped else None,
            "overlapped_steps": len(overlapped),
            "durable_overlapped_step_s_median": round(med(durable_overlapped), 4) if durable_overlapped else None,
            "durable_save_blocked_s_median": round(med(durable_s), 5),
            "sync_torch_save_s_median": round(med(sync_s), 5),
            "stall_vs_sync_save": round(med(snap_s) / med(sync_s), 3),
            "restore_from_memory_s": round(restore_memory, 4), "restore_from_durable_s": round(restore_durable, 4),
            "restored_states_equal": bool(same)}


# --- 1b. the stall under DDP and under FSDP: 2 gloo ranks -------------------------------------------


def _strategy_rank(rank: int, world: int, port: int, strategy: str, steps: int, every: int, out: str) -> None:
    """One rank of the demo GPT under `strategy` (the demo run's per-rank batch), a snapshot every
    `every` steps into a keeper in this process (the send is off the training thread either way:
    what is timed is the rank-side take, as in the built-in loop)."""
    import datetime

    import torch.distributed as dist
    import yaml

    from actors.snapshot_keeper import SnapshotKeeper
    from checkpointing import format
    from checkpointing.client import LocalClient
    from checkpointing.memory import Snapshotter, state_bytes
    from orchestrator.config import config_from_dict
    from orchestrator.gpt import build_model
    from orchestrator.gpt_function import loss_of, make_optimizer
    from orchestrator.parallel import wrap_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    cfg = config_from_dict(yaml.safe_load(open(ROOT / "configs/demo.yaml")))
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=256, block_size=256)
    net = wrap_model(model, strategy=strategy, device=torch.device("cpu"), world_size=world)
    opt = make_optimizer(model, cfg)
    batch = torch.randint(0, 256, (cfg.data.global_batch_size // world, 257),
                          generator=torch.Generator().manual_seed(rank))
    keeper = SnapshotKeeper(f"bench-{rank}", headroom_bytes=0)
    snap = Snapshotter(every_steps=every, limit_bytes=2**40, rank=rank, world_size=world, run_id="bench", attempt=0,
                       keepers=[("", LocalClient(keeper))], report=lambda *a: log(f"rank {rank}: event {a[:3]}"))

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(net, batch).backward()
        opt.step()
        return time.perf_counter() - t

    for _ in range(3):  # warm-up
        step()
    plain, overlapped = [], []
    for i in range(1, steps + 1):
        busy = snap.sender.busy
        (overlapped if busy else plain).append(step())
        if snap.due(i):
            snap.take(i, model=model, optimizer=opt, sampler_state={"samples_consumed": i})
    snap.close()
    shards = format.sharded_state(model, opt)
    held = state_bytes(*shards.values()) if shards is not None else state_bytes(model.state_dict(), opt.state_dict())
    result = {"plain": plain, "overlapped": overlapped, "stall": snap.blocked, "sent": len(snap.sent),
              "snapshot_bytes": keeper.inventory()[-1]["bytes"], "state_bytes": held}
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def strategies(names: list[str], steps: int, every: int, world: int = 2) -> dict:
    """Per strategy, the same model, batch and snapshot cadence on `world` gloo ranks."""
    import socket

    import torch.multiprocessing as mp

    med = statistics.median
    out = {}
    for strategy in names:
        log(f"stall: demo GPT, {world} gloo ranks, {strategy}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        folder = tempfile.mkdtemp(prefix="bench-snap-strategy-")
        mp.start_processes(_strategy_rank, args=(world, port, strategy, steps, every, f"{folder}/r"), nprocs=world,
                           start_method="spawn", join=True)
        ranks = [json.loads(Path(f"{folder}/r.{r}").read_text()) for r in range(world)]
        plain = [t for r in ranks for t in r["plain"]]
        stalls = [t for r in ranks for t in r["stall"]]
        overlapped = [t for r in ranks for t in r["overlapped"]]
        out[strategy] = {"world": world, "snapshots_per_rank": min(r["sent"] for r in ranks),
                         "step_s_median": round(med(plain), 4),
                         "snapshot_stall_s_median": round(med(stalls), 5),
                         "snapshot_stall_s_max": round(max(stalls), 5),
                         "snapshot_stall_pct_of_step": round(100 * med(stalls) / med(plain), 2),
                         "overlapped_step_s_median": round(med(overlapped), 4) if overlapped else None,
                         "state_bytes_per_rank": max(r["state_bytes"] for r in ranks),
                         "snapshot_bytes_per_rank": max(r["snapshot_bytes"] for r in ranks)}
    if {"ddp", "fsdp"} <= set(out):
        out["fsdp_vs_ddp_stall"] = round(out["fsdp"]["snapshot_stall_s_median"] / out["ddp"]["snapshot_stall_s_median"], 3)
        out["fsdp_vs_ddp_snapshot_bytes"] = round(out["fsdp"]["snapshot_bytes_per_rank"] /
                                                  out["ddp"]["snapshot_bytes_per_rank"], 3)
    return out


# --- 2. steps lost per failure ----------------------------------------------------------------------


class KilledAt(GPT):
    """Imported by the workers (model.factory bench.memory_snapshots:killed_gpt): SIGKILLs its own
    process on one rank at one training forward of the first attempt."""

    def __init__(self, *, kill_rank: int, kill_call: int, **kw):
        super().__init__(**kw)
        self.kill_rank, self.kill_call, self.calls = kill_rank, kill_call, 0

    def forward(self, idx):
        if self.training:
            self.calls += 1
            if (self.calls == self.kill_call and int(os.environ["RANK"]) == self.kill_rank
                    and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
                os.kill(os.getpid(), signal.SIGKILL)  # this worker process, of the cluster this bench started
        return super().forward(idx)


def killed_gpt(*, vocab_size: int, block_size: int, kill_rank: int = 1, kill_call: int = 0):
    return KilledAt(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=64, dropout=0.1,
                    kill_rank=kill_rank, kill_call=kill_call)


def lost(steps: int, kill_step: int, durable_every: int, memory_every: int) -> dict:
    import yaml
    from ray.cluster_utils import Cluster

    from dataloading.prepare import prepare
    from orchestrator.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-snap-lost-"))
    data = tmp / "data"
    prepare([str(STDLIB / "json"), str(STDLIB / "email")], str(data), seq_len=65, val_fraction=0.1,
            include=["*.py"], log=lambda *a: None)
    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    out = {}
    try:
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        for name, memory_every_steps in (("durable_only", 0), ("with_snapshots", memory_every)):
            home = tmp / name
            cfg = {
                "run": {"name": name, "seed": 1},
                "scaling": {"num_workers": 2, "cpus_per_worker": 1, "start_timeout_s": 120},
                "cluster": {"dashboard": False},
                "data": {"uri": str(data), "global_batch_size": 8},
                "model": {"factory": "bench.memory_snapshots:killed_gpt", "kwargs": {"kill_call": kill_step + 1}},
                "optim": {"lr": 0.005, "warmup_steps": 5},
                "train": {"max_steps": steps, "eval_every": 0},
                "checkpoint": {"every_steps": durable_every, "memory_every_steps": memory_every_steps},
                "fault_tolerance": {"max_restarts": 2, "backoff_s": 0.1},
                "telemetry": {"flush_every_s": 0.2, "progress_every_s": 1.0, "system_every_s": 0.5},
            }
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            log(f"{name}: launching ({steps} steps, rank 1 killed in step {kill_step})")
            t = time.perf_counter()
            proc = subprocess.run([*ORCH, "launch", str(path), "--address", c.address], cwd=ROOT, capture_output=True,
                                  text=True, timeout=1800, env={**os.environ, "ORCHESTRATOR_HOME": str(home)})
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"{name}: launch failed\n{proc.stdout}\n{proc.stderr}")
            store = Store(home)
            run = store.runs()[-1]["id"]
            attempts = store.attempts(run)
            events = [e["kind"] for e in store.events(run)]
            losses = json.loads(subprocess.run([*ORCH, "metrics", run, "--key", "train/loss", "--rank", "0", "--json"],
                                               cwd=ROOT, capture_output=True, text=True,
                                               env={**os.environ, "ORCHESTRATOR_HOME": str(home)}).stdout)["points"]
            store.close()
            # the victim died in step kill_step, so kill_step steps were done; the store's own figure
            # counts from the last step the metrics actor had seen, which may lag by a flush
            out[name] = {"steps_lost": kill_step - attempts[1]["resumed_from_step"] if attempts[1]["resumed_from_step"]
                         is not None else kill_step, "steps_lost_store": attempts[0]["steps_lost"],
                         "failed_step": attempts[0]["failed_step"],
                         "resumed_from_step": attempts[1]["resumed_from_step"],
                         "recovery_s": attempts[1]["recovery_s"], "wall_s": round(wall, 1),
                         "final_loss": losses[-1]["value"] if losses else None,
                         "restored_from_memory": "snapshot_restore" in events}
            log(f"{name}: {out[name]}")
    finally:
        c.shutdown()  # only the raylets this bench started
    out["final_loss_equal"] = (out["durable_only"]["final_loss"] is not None
                               and out["durable_only"]["final_loss"] == out["with_snapshots"]["final_loss"])
    return out


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="stall: timed steps of the demo GPT")
    ap.add_argument("--every", type=int, default=5, help="stall: a snapshot every N steps")
    ap.add_argument("--run-steps", type=int, default=60, help="steps lost: steps of each run")
    ap.add_argument("--kill-step", type=int, default=38)
    ap.add_argument("--durable-every", type=int, default=20)
    ap.add_argument("--memory-every", type=int, default=4)
    ap.add_argument("--skip-lost", action="store_true", help="only the stall part(s)")
    ap.add_argument("--strategies", default="ddp,fsdp",
                    help="stall on 2 gloo ranks under these parallelism.strategy values ('' to skip)")
    ap.add_argument("--only-strategies", action="store_true", help="only the stall under --strategies")
    a = ap.parse_args()
    result = {"bench": "memory_snapshots", "machine": machine(load_before=load()), **git_state()}
    names = [n for n in a.strategies.split(",") if n]
    if a.only_strategies:
        result["strategies"] = strategies(names, a.steps, a.every)
        result["load_after"] = load()
        print(json.dumps(result))
        return
    log("stall: demo GPT, one process")
    result["stall"] = stall(a.steps, a.every)
    if names:
        result["strategies"] = strategies(names, a.steps, a.every)
    if not a.skip_lost:
        result["lost"] = lost(a.run_steps, a.kill_step, a.durable_every, a.memory_every)
    result["load_after"] = load()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
