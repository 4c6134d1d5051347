"""A plain torchrun-style training script, as a team would have it: env:// rendezvous, DDP, its
own snapshot file to resume from. It runs unchanged under `torchrun --nproc-per-node 2` too."""

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=20)
p.add_argument("--snapshot", default=None, help="resume from / save to this file")
p.add_argument("--save-every", type=int, default=5)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--fail-at", type=int, default=None, help="exit 3 at this step")
p.add_argument("--hang-at", type=int, default=None, help="rank 1 sleeps forever at this step, once")
p.add_argument("--stop-at", type=int, default=None, help="rank 1 stops itself (SIGSTOP) at this step, once")
p.add_argument("--report", action="store_true", help="use orchestrator.worker.log")
args = p.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the launcher
rank, world = dist.get_rank(), dist.get_world_size()
if rank == 0:
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_MAX_RESTARTS"]
    print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)

torch.manual_seed(0)
model = DDP(nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
start = 0
if args.snapshot and os.path.exists(args.snapshot):
    snap = torch.load(args.snapshot, weights_only=True)
    model.module.load_state_dict(snap["model"])
    opt.load_state_dict(snap["optimizer"])
    start = snap["step"] + 1
    print(f"resumed from step {start}", flush=True)

g = torch.Generator().manual_seed(rank)
for step in range(start, args.steps):
    if args.fail_at == step:
        print(f"failing at step {step}", file=sys.stderr, flush=True)
        sys.exit(3)
    if args.hang_at == step and rank == 1 and args.snapshot and not os.path.exists(args.snapshot + ".hung"):
        open(args.snapshot + ".hung", "w").close()
        time.sleep(3600)
    if args.stop_at == step and rank == 1 and args.snapshot and not os.path.exists(args.snapshot + ".stopped"):
        open(args.snapshot + ".stopped", "w").close()
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen as by job control: only SIGCONT or SIGKILL ends it
    x = torch.randn(16, 8, generator=g)
    loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.4f}", flush=True)
    if args.report:
        from orchestrator import worker

        worker.log({"train/loss": loss.item()}, step=step)
    if args.snapshot and rank == 0 and (step + 1) % args.save_every == 0:
        torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "step": step},
                   args.snapshot + ".tmp")
        os.replace(args.snapshot + ".tmp", args.snapshot)
    if args.sleep:
        time.sleep(args.sleep)
dist.barrier()
dist.destroy_process_group()
print("done", flush=True)
