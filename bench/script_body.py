"""A torchrun-style training script, as a team would write it, for bench/script_vs_torchrun.py:
env:// rendezvous, DDP over gloo, an MLP on synthetic data, its own snapshot file every K steps and
a resume from it. Both launchers run this file unchanged (`torchrun ... script_body.py ARGS` and
`orchestrator launch` with `entrypoint.script`).

The only bench-specific part is --step-log DIR: each process appends to DIR/rank{R}-pid{P}.log
"exec T" (the interpreter reached this file), "ready T" (process group up), "start T" (model and
snapshot loaded) and "step N T C" after every optimizer step (C: this process's CPU seconds so
far), in the format bench/recovery.py reads.
Batches are drawn from a generator seeded by (seed, step, rank), so a resumed run sees the batches
an uninterrupted one would have.
"""

import time

EXEC = time.time()  # before `import torch`: the launcher's part of start-up ends here

import argparse  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=300)
p.add_argument("--snapshot", required=True, help="resume from / save to this file")
p.add_argument("--save-every", type=int, default=50)
p.add_argument("--step-log", default=None, help="directory for the per-process step log")
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--batch", type=int, default=64, help="per-rank batch size")
p.add_argument("--print-every", type=int, default=10)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

log = None
if args.step_log:  # opened first: a process that never gets through init_process_group is on record too
    log = open(os.path.join(args.step_log, f"rank{os.environ['RANK']}-pid{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115
    log.write(f"exec {EXEC:.6f}\n")
torch.set_num_threads(1)  # one core per rank
torch.use_deterministic_algorithms(True)
dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher
rank, world = dist.get_rank(), dist.get_world_size()
if log:
    log.write(f"ready {time.time():.6f}\n")

torch.manual_seed(args.seed)  # the same initial weights on every rank
model = DDP(nn.Sequential(nn.Linear(256, args.hidden), nn.ReLU(), nn.Linear(args.hidden, args.hidden), nn.ReLU(),
                          nn.Linear(args.hidden, 10)))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
start = 0
if os.path.exists(args.snapshot):
    snap = torch.load(args.snapshot, weights_only=True)
    model.module.load_state_dict(snap["model"])
    opt.load_state_dict(snap["optimizer"])
    start = snap["step"] + 1
    if rank == 0:
        print(f"resumed from step {start}", flush=True)
if log:
    log.write(f"start {time.time():.6f}\n")

for step in range(start, args.steps):
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * world + rank)
    x = torch.randn(args.batch, 256, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if log:
        log.write(f"step {step} {time.time():.6f} {time.process_time():.6f}\n")
    if rank == 0 and step % args.print_every == 0:
        print(f"step {step} loss {loss.item():.4f}", flush=True)
    if rank == 0 and (step + 1) % args.save_every == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "step": step},
                   args.snapshot + ".tmp")
        os.replace(args.snapshot + ".tmp", args.snapshot)  # a kill mid-save leaves the last good one
dist.barrier()
dist.destroy_process_group()
if rank == 0:
    print("done", flush=True)
