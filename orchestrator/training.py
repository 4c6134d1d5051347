"""The training loop, written out top to bottom: one function a worker runs after rendezvous.

Collaborators come in as arguments (`log` receives metrics), so the loop runs the same inside a
Ray actor, in a test, or in a benchmark.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn import functional as F

from common.errors import ConfigError, DataError, NonFiniteLoss
from dataloading.dataset import TokenDataset
from dataloading.sampler import GlobalSampler, batch_fingerprint
from orchestrator import sdc, stopping, telemetry
from orchestrator.config import Config
from orchestrator.gpt import build_model
from orchestrator.hang.health import Health
from orchestrator.parallel import AsyncGradReduce, autocast, grad_sync, is_sharded, wrap_model
from orchestrator.restore import restore_state

LogFn = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device


def setup_torch(cfg: Config, rank: int) -> None:
    normal_priority()  # first: the threads torch and gloo start from here on inherit it
    torch.set_num_threads(cfg.scaling.torch_threads)
    if cfg.train.deterministic:
        use_deterministic_algorithms(compiling=cfg.train.compile)


def normal_priority() -> int:
    """Ray starts every worker process at nice 15 (its `worker_niceness`, so tasks never starve
    its daemons). A rank is the job itself: at 15 any nice-0 process (a Ray daemon waking up,
    another tenant) takes the core from it, and a DDP group runs at its slowest rank's pace
    (measured: same CPU per step as a bare loop, 1.8-2.2x the wall time under load; docs/BENCHMARKS.md).
    So every thread of this process goes back to the niceness of the process that started it
    (the raylet: that of `ray start`/the driver), never above it, when allowed (root or
    CAP_SYS_NICE; otherwise it stays as it is). Linux keeps a niceness per thread. Returns the
    niceness now."""
    try:
        target = os.getpriority(os.PRIO_PROCESS, os.getppid())
        if os.getpriority(os.PRIO_PROCESS, 0) <= target:
            return os.getpriority(os.PRIO_PROCESS, 0)
        for tid in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), target)
    except (OSError, AttributeError):  # not permitted, a thread gone meanwhile, no /proc (not Linux)
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def use_deterministic_algorithms(*, compiling: bool = False) -> None:
    """torch.use_deterministic_algorithms(True) without its import of torch._inductor, which costs
    seconds on every worker start (and so on every restart), unless the model will be compiled:
    then inductor is told too."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    if compiling:
        torch.use_deterministic_algorithms(True)
        return
    torch._C._set_deterministic_algorithms(True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True


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


@contextmanager
def counted(health: Health, collective: bool, device: torch.device):
    """Counts a phase that runs collectives (what the hang watchdog reads). On CUDA the host
    leaves the phase with its collectives queued, not done: a CUDA event recorded after them
    tells the heartbeat thread when they complete (hang/health.py)."""
    health.coll_entered += collective
    yield
    if collective and device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        health.completes_later(event)
    elif collective:
        health.coll_completed += 1


def open_data(cfg: Config) -> tuple[TokenDataset, TokenDataset | None]:
    train = TokenDataset.from_config(cfg.data, "train")  # remote shards go through the node cache
    if len(train) < cfg.data.global_batch_size:
        raise DataError(
            f"{cfg.data.uri}: train split has {len(train)} sequences, fewer than one global batch "
            f"(data.global_batch_size={cfg.data.global_batch_size})"
        )
    val = TokenDataset.from_config(cfg.data, "val") if "val" in train.index.splits else None
    return train, val


@torch.no_grad()
def evaluate(model, val: TokenDataset, cfg: Config, ctx: WorkerContext, health: Health | None = None) -> float:
    """Mean loss over the same fixed held-out batches every time, averaged across ranks."""
    model.eval()
    b = min(cfg.data.global_batch_size, len(val) // ctx.world_size * ctx.world_size)
    sampler = GlobalSampler(len(val), b, seed=0)
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for k in range(min(cfg.train.eval_batches, sampler.batches_per_epoch)):
        ids = sampler.local_batch(k, ctx.rank, ctx.world_size)
        with autocast(ctx.device, cfg.train.precision):
            loss = loss_of(model, val.batch(ids).to(ctx.device))
        total[0] += loss.double() * len(ids)
        total[1] += len(ids)
        if health is not None:
            health.progress += 1
    if ctx.world_size > 1:
        with counted(health, True, ctx.device) if health is not None else nullcontext():
            dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


def data_index(step: int, skipped: list[int]) -> int:
    """The global batch optimizer step `step` trains on when the batches in `skipped` are left
    out (batches that gave a non-finite loss, with fault_tolerance.on_nonfinite=rollback)."""
    d = step
    for k in sorted(skipped):
        if k <= d:
            d += 1
    return d


def train(cfg: Config, ctx: WorkerContext, log: LogFn, checkpointer=None, restore=None,
          skipped: list[int] = (), health: Health | None = None, snapshots=None) -> dict:
    """Train to train.max_steps, from step 0 or from `restore` (a loaded checkpoint or in-memory
    snapshot); returns a summary for the driver. `snapshots`: a checkpointing.memory.Snapshotter."""
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    train_data, val_data = open_data(cfg)
    seq_len = train_data.seq_len
    accum = micro_batches(cfg, ctx.world_size)
    model = build_model(cfg.model, vocab_size=train_data.index.vocab_size, block_size=seq_len - 1)
    # `ddp` is what is called (a DDP wrapper, or the FSDP-sharded model itself); `model` is the module
    multi = ctx.world_size > 1
    async_grads = cfg.distributed.async_collectives and multi
    ddp = wrap_model(model, strategy=cfg.parallelism.strategy, device=ctx.device, world_size=ctx.world_size,
                     compile=cfg.train.compile, async_grads=async_grads)
    reducer = AsyncGradReduce(model, ctx.world_size) if async_grads else None
    sharded = is_sharded(model)
    health = health or Health(ctx.rank)
    stop = stopping.Agreement(ctx.world_size, ctx.device, health)  # `orchestrator stop`: all ranks, same step
    stopped_at = None
    optimizer = make_optimizer(model, cfg)
    sampler = train_data.sampler(cfg.data, seed=cfg.run.seed)  # data.shuffle etc.; prefetches remote shards
    torch.manual_seed(cfg.run.seed * 1000 + ctx.rank + 1)  # per-rank stream for dropout
    start = 0
    if restore is not None:
        start = restore_state(restore, model=model, optimizer=optimizer, sampler=sampler, seed=cfg.run.seed,
                              rank=ctx.rank, world_size=ctx.world_size, data_step=lambda s: data_index(s, skipped))

    tokens_per_step = cfg.data.global_batch_size * (seq_len - 1)
    first_loss = last_loss = eval_loss = None
    started = last = time.perf_counter()
    for step in range(start, cfg.train.max_steps):
        telemetry.set_step(step)
        batch_index = data_index(step, skipped)
        health.phase = "data"
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = sampler.local_batch(batch_index, ctx.rank, ctx.world_size)
        batch = train_data.batch(ids).to(ctx.device, non_blocking=True)

        optimizer.zero_grad(set_to_none=True)
        compute_s, total = 0.0, None
        # accumulation: the rank's batch in `accum` equal micro-batches (the global batch, and so
        # the data order, is unchanged); each loss scaled by 1/accum, gradients reduced on the last
        for i, micro in enumerate(batch.chunk(accum) if accum > 1 else (batch,)):
            final = i == accum - 1
            with grad_sync(ddp, final):
                health.phase = "forward"
                compute_started = time.perf_counter()
                with counted(health, multi and sharded, ctx.device), autocast(ctx.device, cfg.train.precision):
                    loss = loss_of(ddp, micro)  # FSDP all-gathers each block's weights in here
                compute_s += time.perf_counter() - compute_started  # DDP: no collective in it
                # DDP's gradient all-reduces are issued inside backward (on gloo also waited for
                # there; on CUDA queued, hence `counted`'s event): counting them once per step here
                # costs nothing (a Python comm hook per bucket cost ~3%)
                health.phase = "backward"
                with counted(health, multi and (final or sharded) and reducer is None, ctx.device):
                    (loss if accum == 1 else loss / accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if reducer is not None:  # issued now, waited for below: the host runs ahead as on CUDA
            health.coll_entered += 1
            health.completes_later(reducer.issue())
        health.phase = "optimizer"
        if reducer is not None:
            reducer.wait()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, already reduced across ranks
            grad_norm = grad_norm.full_tensor()
        loss_value = total.item() if accum == 1 else total.item() / accum
        if not math.isfinite(loss_value):  # before the update: the weights stay as they were
            raise NonFiniteLoss(batch_index, loss_value)
        optimizer_started = time.perf_counter()
        optimizer.step()
        compute_s += time.perf_counter() - optimizer_started
        is_last = step == cfg.train.max_steps - 1
        every = cfg.health.sdc_check_every
        if multi and every and not sharded and ((step + 1) % every == 0 or is_last):  # before a checkpoint of it
            health.phase = "optimizer"
            with counted(health, True, ctx.device):
                sdc.check(model, optimizer, step=step + 1, device=ctx.device)

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
            metrics["data/batch_fingerprint"] = float(batch_fingerprint(sampler.global_batch(batch_index)))
        if val_data is not None and cfg.train.eval_every and ((step + 1) % cfg.train.eval_every == 0 or is_last):
            health.phase = "eval"
            eval_loss = evaluate(ddp, val_data, cfg, ctx, health)
            if ctx.rank == 0:
                metrics["eval/loss"] = eval_loss
            last = time.perf_counter()  # eval time is not step time
        log(step, metrics)
        health.step = step
        health.progress += 1
        stop_now = stop.should_stop() and not is_last  # every rank agrees: a final checkpoint, then the end
        if checkpointer is not None and (stop_now or checkpointer.due(step + 1, is_last)):  # step + 1 steps done
            health.phase = "checkpoint"
            next_batch = data_index(step + 1, skipped)
            checkpointer.save(step + 1, model=model, optimizer=optimizer, sampler_state=sampler.state_dict(next_batch),
                              metrics=metrics, log=log)
            if hasattr(log, "flush"):  # what a restore will not replay must reach the store now
                log.flush()
        if snapshots is not None and not is_last and snapshots.due(step + 1):  # its sender flushes the metrics
            health.phase = "checkpoint"
            snapshots.take(step + 1, model=model, optimizer=optimizer,
                           sampler_state=sampler.state_dict(data_index(step + 1, skipped)), log=log)
        first_loss = loss_value if first_loss is None else first_loss
        last_loss = loss_value
        if stop_now:
            stopped_at = step + 1
            break
    stop.close()
    health.phase = "checkpoint"
    if checkpointer is not None:
        checkpointer.close(log)  # waits for the last upload and its commit
    health.phase = "done"
    return {
        "steps": (stopped_at or cfg.train.max_steps) - start,
        "start_step": start,
        "stopped": stopped_at is not None,
        "stopped_at": stopped_at,  # steps done when `orchestrator stop` ended it (its final checkpoint's step)
        "first_loss": first_loss,
        "last_loss": last_loss,
        "eval_loss": eval_loss,
        "train_time_s": time.perf_counter() - started,
    }
