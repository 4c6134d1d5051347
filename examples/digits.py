"""A team's own training function, run by `orchestrator launch examples/digits.yaml`: a small
classifier on scikit-learn's handwritten digits (the data ships inside the package, offline),
with every service reaching it through ctx: DDP, our sampler's order, checkpoints, bit-exact
resume, tracking and the stall watchdog.

    fn(ctx, **entrypoint.kwargs), once per rank
"""

from __future__ import annotations

import torch
from torch import nn


class Digits(torch.utils.data.Dataset):
    def __init__(self, split: str, holdout: int = 297):
        from sklearn.datasets import load_digits  # pip install scikit-learn (the `examples` extra)

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
        keep = slice(None, -holdout) if split == "train" else slice(-holdout, None)
        self.x, self.y = x[keep], y[keep]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def train(ctx, *, batch_size: int = 16, lr: float = 1e-2, hidden: int = 128, eval_every: int = 50):
    model = ctx.prepare(nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = ctx.data_loader(Digits("train"), batch_size)
    test = Digits("test")
    step = 0
    state = ctx.restore()  # None on a fresh start
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"] + 1
    while step < ctx.max_steps:
        for x, y in loader:
            if step >= ctx.max_steps:
                break
            loss = nn.functional.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            metrics = {"train/loss": loss.item()}
            if (step + 1) % eval_every == 0 or step + 1 == ctx.max_steps:
                metrics["eval/accuracy"] = accuracy(model, test, ctx.device)
            ctx.log(metrics, step)
            ctx.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, step)
            step += 1


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits, device) -> float:
    model.eval()
    right = (model(data.x.to(device)).argmax(dim=1) == data.y.to(device)).float().mean().item()
    model.train()
    return right
