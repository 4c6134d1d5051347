"""The built-in GPT recipe as a training function on ctx: `train_gpt(ctx)`.

Written top to bottom with the public ctx API (docs/ENTRYPOINTS.md), the model
(orchestrator/gpt.py) and the token data (dataloading/): what a team writing its own loop gets
is what the built-in loop uses. `entrypoint: {function: "orchestrator.gpt_function:train_gpt"}`
trains, logs and checkpoints bit for bit as the built-in loop does with the same config, and
their checkpoints are one layout, so either resumes or forks the other's.

Settings come from the config's data.*, model.*, optim.* and train.* sections, as for the
built-in loop.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F

from common.errors import ConfigError, DataError
from dataloading.dataset import TokenDataset
from dataloading.sampler import GlobalSampler, batch_fingerprint
from orchestrator.config import Config
from orchestrator.gpt import build_model


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))


def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    x, y = batch[:, :-1], batch[:, 1:]
    logits = model(x).float()  # bf16 logits under autocast: the softmax in fp32 (a no-op for fp32)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def micro_batches(cfg: Config, world_size: int) -> int:
    """train.grad_accum_steps, checked against this group's per-rank batch (an elastic group may
    be smaller than scaling.num_workers)."""
    n, per_rank = cfg.train.grad_accum_steps, cfg.data.global_batch_size // world_size
    if per_rank % n:
        raise ConfigError(f"train.grad_accum_steps={n} must divide the per-rank batch data.global_batch_size / "
                          f"world size = {cfg.data.global_batch_size}/{world_size} = {per_rank}")
    return n


def open_data(cfg: Config) -> tuple[TokenDataset, TokenDataset | None]:
    train = TokenDataset.from_config(cfg.data, "train")  # remote shards go through the node cache
    if len(train) < cfg.data.global_batch_size:
        raise DataError(
            f"{cfg.data.uri}: train split has {len(train)} sequences, fewer than one global batch "
            f"(data.global_batch_size={cfg.data.global_batch_size})"
        )
    val = TokenDataset.from_config(cfg.data, "val") if "val" in train.index.splits else None
    return train, val


class Sequences(torch.utils.data.Dataset):
    """A TokenDataset as ctx.data_loader reads it: a batch of sequence ids in one read
    (`__getitems__`), as one (n, seq_len) int64 tensor."""

    def __init__(self, data: TokenDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data.batch([i])[0]

    def __getitems__(self, ids: list[int]) -> torch.Tensor:
        return self.data.batch(ids)


def whole(batch: torch.Tensor) -> torch.Tensor:
    """The collate_fn of a batch read whole: nothing to stack."""
    return batch


@torch.no_grad()
def evaluate(ctx, model: torch.nn.Module, val: TokenDataset) -> float:
    """Mean loss over the same fixed held-out batches every time, averaged across ranks."""
    cfg = ctx.config
    model.eval()
    b = min(cfg.data.global_batch_size, len(val) // ctx.world_size * ctx.world_size)
    sampler = GlobalSampler(len(val), b, seed=0)
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    with ctx.phase("eval"):
        for k in range(min(cfg.train.eval_batches, sampler.batches_per_epoch)):
            ids = sampler.local_batch(k, ctx.rank, ctx.world_size)
            with ctx.autocast():
                loss = loss_of(model, val.batch(ids).to(ctx.device))
            total[0] += loss.double() * len(ids)
            total[1] += len(ids)
            ctx.progress()  # a long eval is not a stall
    if ctx.world_size > 1:
        with ctx.phase("eval", collectives=True):
            dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def train_gpt(ctx) -> None:
    """Train the config's GPT to train.max_steps, from step 0 or from the checkpoint ctx restores."""
    cfg = ctx.config
    train_data, val_data = open_data(cfg)
    seq_len = train_data.seq_len
    accum = micro_batches(cfg, ctx.world_size)
    model = build_model(cfg.model, vocab_size=train_data.index.vocab_size, block_size=seq_len - 1)
    net = ctx.prepare(model)  # what is called: a DDP wrapper, or the FSDP-sharded model itself
    optimizer = make_optimizer(model, cfg)
    loader = ctx.data_loader(Sequences(train_data), cfg.data.global_batch_size // ctx.world_size, collate_fn=whole,
                             sampler=train_data.sampler(cfg.data, seed=cfg.run.seed))  # data.shuffle, prefetch
    ctx.restore(into={"model": model, "optimizer": optimizer})

    tokens_per_step = cfg.data.global_batch_size * (seq_len - 1)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    step, last = ctx.start_step, time.perf_counter()
    while step < ctx.max_steps:
        for batch in loader:  # the rest of this epoch (passing over batches a rollback skipped)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch.to(ctx.device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            compute_s, total = 0.0, None
            # accumulation: the rank's batch in `accum` equal micro-batches (the global batch, and so
            # the data order, is unchanged); each loss scaled by 1/accum, gradients reduced on the last
            for i, micro in enumerate(batch.chunk(accum) if accum > 1 else (batch,)):
                final = i == accum - 1
                with ctx.grad_sync(net, final):
                    started = time.perf_counter()
                    with ctx.phase("forward", collectives=ctx.sharded), ctx.autocast():
                        loss = loss_of(net, micro)  # FSDP all-gathers each block's weights in here
                    compute_s += time.perf_counter() - started  # DDP: no collective in it
                    ctx.backward(loss if accum == 1 else loss / accum, final=final)  # DDP reduces in here
                total = loss.detach() if total is None else total + loss.detach()
            ctx.reduce_gradients()
            with ctx.phase("optimizer"):
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced across ranks
                    grad_norm = grad_norm.full_tensor()
                loss_value = total.item() if accum == 1 else total.item() / accum
                ctx.check_loss(loss_value, loader)  # before the update: the weights stay as they were
                started = time.perf_counter()
                optimizer.step()
                compute_s += time.perf_counter() - started
            ctx.check_replicas(model, optimizer, step)  # before a checkpoint of it

            now = time.perf_counter()
            step_time, last = now - last, now
            metrics = {
                "train/loss": loss_value,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "train/step_time_s": step_time,
                "train/tokens_per_s": tokens_per_step / step_time,
                "health/compute_s": compute_s,  # what straggler scoring compares across ranks
            }
            if ctx.rank == 0:
                metrics["data/batch_fingerprint"] = float(batch_fingerprint(loader.sampler.global_batch(loader.index)))
            is_last = step == ctx.max_steps - 1
            if val_data is not None and cfg.train.eval_every and ((step + 1) % cfg.train.eval_every == 0 or is_last):
                eval_loss = evaluate(ctx, net, val_data)
                if ctx.rank == 0:
                    metrics["eval/loss"] = eval_loss
                last = time.perf_counter()  # eval time is not step time
            ctx.log(metrics, step)
            ctx.save({"model": model, "optimizer": optimizer}, step)  # when due; after `stop`, the last
            step += 1
            if step >= ctx.max_steps:
                break
