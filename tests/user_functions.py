"""Users' own training functions (entrypoint.function), as a team would write them against ctx."""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import nn


class Points(torch.utils.data.Dataset):
    """A fixed regression problem: y = sin(3 x) + noise, the same on every rank and every run."""

    def __init__(self, n: int = 512):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.rand(n, 4, generator=g) * 2 - 1
        self.y = torch.sin(3 * self.x.sum(dim=1, keepdim=True)) + 0.05 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def regression(ctx, *, batch_size: int = 8, lr: float = 0.01, pause_s: float = 0.0, fail_at: int | None = None,
               sigkill_at: int | None = None):
    """An MLP with dropout trained with AdamW: resumes through ctx.save / ctx.restore. `sigkill_at`:
    rank 1 SIGKILLs itself at that step of the first attempt (a lost process, not a user error)."""
    model = ctx.prepare(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = ctx.data_loader(Points(), batch_size)
    state = ctx.restore()
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"] + 1
    while step < ctx.max_steps:
        for x, y in loader:
            if step >= ctx.max_steps:
                break
            if fail_at is not None and step == fail_at:
                raise ValueError(f"bad batch at step {step}")
            if step == sigkill_at and ctx.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
            noise = torch.randn(()).item() * 1e-3  # a random number per step: RNG state must resume too
            loss = nn.functional.mse_loss(model(x.to(ctx.device)), y.to(ctx.device)) + noise
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctx.log({"train/loss": loss.item(), "data/first_x": float(x[0, 0])}, step)
            ctx.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, step)
            if pause_s:
                time.sleep(pause_s)
            step += 1


def no_ctx():  # takes no ctx: refused before any worker starts
    pass


def saves_a_list(ctx):
    ctx.save([1, 2, 3], 0)


def keyword_only(ctx, *, lr):  # its settings come from entrypoint.kwargs
    return lr
