"""One training function body for bench/function_vs_raytrain.py, run two ways: as our function mode
(`entrypoint.function: bench.function_body:ours`, fn(ctx, **kw)) and as Ray Train v2's
`TorchTrainer(ray_train)`. The shared core (model, data, one training step) is written once; the
two adapters differ only where the APIs do:

|                     | ours (`ctx`)                          | Ray Train (`ray.train`)                       |
| ------------------- | ------------------------------------- | --------------------------------------------- |
| DDP wrap            | ctx.prepare(model)                    | ray.train.torch.prepare_model(model)          |
| batches             | ctx.data_loader(data, batch)          | GlobalSampler(...).local_batch(step, ...), the same order and collate |
| resume              | ctx.restore() (also loader and RNGs)  | ray.train.get_checkpoint() + torch.load        |
| tracking            | ctx.log({"train/loss"}, step)         | ray.train.report({"loss"}) (no checkpoint)    |
| checkpoint (every K)| ctx.save(state, step) on every step; it saves when due (and is where the ranks agree to stop: one 1-float all-reduce per call) | rank 0 torch.save to a temp dir + ray.train.report(checkpoint=...), the others report(None) |

Both log the loss every `log_every` steps and checkpoint model + AdamW state + step every
`ckpt_every` steps. Each process appends "start T" and "step N T B" lines to its own file in
`step_log_dir` (bench/recovery.py's install_step_log, an optimizer post-step hook).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate


class Synthetic(torch.utils.data.Dataset):
    """A fixed classification set: the same on every rank, every run and both systems."""

    def __init__(self, n: int = 8192, dim: int = 256, classes: int = 10, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _step_log(step_log_dir: str, rank: int, model: nn.Module) -> None:
    from bench.recovery import install_step_log  # workers import the repo's packages from its root

    install_step_log(step_log_dir, rank, model)


# --- ours: fn(ctx, **kwargs) ----------------------------------------------------------------------


def ours(ctx, *, hidden: int = 512, batch: int = 64, log_every: int = 10, step_log_dir: str | None = None) -> None:
    """checkpoint.every_steps (the config) plays ckpt_every; ctx.max_steps is train.max_steps.
    (Defaults only because our pre-flight check rejects required keyword-only arguments.)"""
    model = make_model(hidden)
    if step_log_dir:
        _step_log(step_log_dir, ctx.rank, model)
    model = ctx.prepare(model)
    opt = make_optimizer(model)
    loader = ctx.data_loader(Synthetic(), batch)
    step = 0
    state = ctx.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"] + 1
    while step < ctx.max_steps:
        for x, y in loader:
            if step >= ctx.max_steps:
                break
            loss = train_step(model, opt, x, y)
            if (step + 1) % log_every == 0:
                ctx.log({"train/loss": loss.item()}, step)
            ctx.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, step)
            step += 1


# --- the peer: Ray Train's train_loop_per_worker(config) ----------------------------------------------


def ray_train(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from dataloading.sampler import GlobalSampler

    torch.set_num_threads(1)  # as ours does per worker (scaling.torch_threads=1)
    torch.use_deterministic_algorithms(True)  # as ours (train.deterministic)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])  # the same initial weights on every rank, as ctx does
    model = make_model(config["hidden"])
    _step_log(config["step_log_dir"], rank, model)
    opt = make_optimizer(model)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"] + 1
    model = ray.train.torch.prepare_model(model)
    data = Synthetic()
    sampler = GlobalSampler(len(data), config["batch"] * world, seed=config["seed"])  # ctx.data_loader's order
    total, every, log_every = config["max_steps"], config["ckpt_every"], config["log_every"]
    for step in range(start, total):
        x, y = default_collate([data[int(i)] for i in sampler.local_batch(step, rank, world)])
        loss = train_step(model, opt, x, y)
        if (step + 1) % every == 0 or step + 1 == total:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "step": step},
                               Path(d, "state.pt"))
                    ray.train.report({"loss": loss.item(), "step": step},
                                     checkpoint=ray.train.Checkpoint.from_directory(d))
                else:
                    ray.train.report({"loss": loss.item(), "step": step}, checkpoint=None)
        elif (step + 1) % log_every == 0:
            ray.train.report({"loss": loss.item(), "step": step})
