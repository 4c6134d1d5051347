"""What a rank's process runs once it has joined the group: its services (metric sender,
heartbeats, system sampler, checkpointer, and the checkpoint to restore) around what the run's
entrypoint asks for: the built-in training loop (itself a function on ctx: entrypoints.run_gpt),
a user's function (entrypoints.run_function), or a user's script (entrypoints.run_script). The
TrainWorker actor (actors/train_worker.py) only hosts it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import ray

from actors.metric_sender import MetricSender
from actors.system_stats import SystemSampler
from orchestrator import rendezvous, snapshots, telemetry
from orchestrator.config import Config, config_from_dict, redact
from orchestrator.hang.health import Health, Heartbeat


@dataclass
class Services:
    """A rank's side of the run: what every entrypoint is given."""

    cfg: Config
    member: rendezvous.Member
    sender: MetricSender
    health: Health
    checkpointer: object | None  # checkpointing.writer.Checkpointer
    loaded: object | None  # checkpointing.loader.LoadedCheckpoint to restore, None on a fresh start
    snapshots: object | None = None  # checkpointing.memory.Snapshotter, with checkpoint.memory_every_steps


@contextlib.contextmanager
def services(cfg: Config, *, metrics, checkpoints=None, health_monitor=None, restore_step: int | None = None,
             restore_uri: str | None = None, snapshot_to: dict | None = None, snapshot_from: dict | None = None,
             relay=None):
    """Start the rank's services; with `restore_step`, load the newest committed checkpoint at or
    below it that verifies (every rank reads every file, so all reach the same verdict), in the
    run's own checkpoint location or `restore_uri` (a fork's parent's). `snapshot_from`: an
    in-memory snapshot to restore instead (snapshots.restore); `snapshot_to`: where this rank's
    snapshots go (snapshots.snapshotter); `relay`: the node's relay, which heartbeats and metrics
    go through when set (actors/node_relay.py)."""
    from checkpointing.worker import make_checkpointer  # imports torch: only in the rank's process

    me = rendezvous.member()
    sender = MetricSender(metrics, me.rank, flush_every_s=cfg.telemetry.flush_every_s, relay=relay)
    checkpointer = None
    if checkpoints is not None:
        checkpointer = make_checkpointer(cfg.checkpoint, config=redact(cfg.to_dict()), rank=me.rank,
                                         world_size=me.world_size, coordinator=checkpoints, flush=sender.flush)
    health = Health(me.rank)
    beats = Heartbeat(health_monitor, health, cfg.hang.heartbeat_s, relay=relay).start() if health_monitor else None
    health.phase = "checkpoint" if restore_step is not None else "start"
    telemetry.attach(sender)
    sampler = SystemSampler(sender.log, cfg.telemetry.system_every_s).start()
    try:
        loaded = snapshots.restore(snapshot_from, rank=me.rank, metrics=metrics) if snapshot_from else None
        if loaded is None and restore_step is not None:
            loaded = _load(cfg, checkpointer, me.rank, restore_step, restore_uri, metrics=metrics,
                           checkpoints=checkpoints)
        snapper = snapshots.snapshotter(cfg, snapshot_to, me, sender, metrics) if snapshot_to else None
        yield Services(cfg=cfg, member=me, sender=sender, health=health, checkpointer=checkpointer, loaded=loaded,
                       snapshots=snapper)
        if snapper is not None:
            snapper.close()
    finally:
        sampler.stop()
        if beats:
            beats.stop()
        telemetry.attach(None)
        sender.close()


def with_config(fn, config: dict, /, *args, **kwargs):
    """fn(Config, ...) in the rank's process, from the config as plain data: the worker checks it
    against its own code (a driver of another version gets a clear error, not a half-built object)."""
    return fn(config_from_dict(config), *args, **kwargs)


# what a rank imports before its first step: a standby worker (orchestrator/standby.py) imports it
# ahead; torch._dynamo comes with DDP's constructor and deterministic algorithms (~1 s of CPU)
WARM_MODULES = ("torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo", "orchestrator.training",
                "orchestrator.entrypoints", "orchestrator.gpt_function", "checkpointing.worker", "checkpointing.loader")


def warm(cfg: Config) -> float:
    """A standby worker's preparation, in its process: the rank's imports (at the niceness Ray
    gives workers, so the training ranks on the node go first), and for a script run its warm
    process. Returns the seconds it took."""
    import importlib
    import time

    from orchestrator import script, zygote

    t0 = time.monotonic()
    for name in WARM_MODULES:
        importlib.import_module(name)
    for name in zygote.WARM_IF_POSSIBLE:
        try:
            importlib.import_module(name)
        except Exception:  # best effort, as in the warm script process
            pass
    if cfg.entrypoint.kind == "script":
        script.prepare(cfg)
    return time.monotonic() - t0


def run(cfg: Config, *, skipped: list[int] = (), **kw) -> dict:
    """The built-in GPT loop, trained to the end: itself a function on ctx (entrypoints.run_gpt)."""
    from orchestrator.entrypoints import run_gpt  # it imports this module

    return run_gpt(cfg, skipped=skipped, **kw)


def _load(cfg: Config, checkpointer, rank: int, restore_step: int, restore_uri: str | None, *, metrics,
          checkpoints):
    import torch
    import torch.distributed as dist

    from checkpointing.loader import load_latest

    corrupt = []  # every rank reads every file, so every rank sees the same ones; rank 0 reports them
    if restore_uri is not None:
        where = restore_uri
        loaded = load_latest(restore_uri, rank=rank, max_step=restore_step,
                             storage_options=cfg.checkpoint.storage_options, on_corrupt=corrupt.append)
    elif checkpointer is not None:
        where = checkpointer.root
        loaded = load_latest(checkpointer.root, rank=rank, max_step=restore_step, fs=checkpointer.fs,
                             on_corrupt=corrupt.append)
    else:
        raise RuntimeError("restoring needs the checkpoint coordinator")
    if rank == 0 and corrupt:
        _report_corrupt(corrupt, loaded, where, metrics=metrics, checkpoints=checkpoints if restore_uri is None else None)
    if loaded is None:
        raise RuntimeError(f"no checkpoint at or below step {restore_step} verifies in {where}")
    if dist.is_initialized():  # every rank must resume from the same step
        steps = torch.tensor([loaded.step, -loaded.step], dtype=torch.int64)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise RuntimeError(f"ranks disagree on the checkpoint to resume from ({-int(steps[1])}..{int(steps[0])})")
    return loaded


def _report_corrupt(corrupt: list, loaded, where: str, *, metrics, checkpoints) -> None:
    """Corrupt checkpoints met on the way to a restore: marked corrupt in the store (the run's own
    ones), and an alert naming the checkpoint used instead."""
    fallback = f"restored from step {loaded.step}" if loaded is not None else "no older checkpoint verifies"
    waits = []
    for e in corrupt:
        if checkpoints is not None:
            waits.append(checkpoints.corrupt.remote(e.step, e.reason))
        waits.append(metrics.alert.remote(
            "checkpoint_corrupt", "error", f"checkpoint of step {e.step} in {where} is corrupt ({e.reason}); {fallback}",
            step=e.step, rank=0, data={"step": e.step, "reason": e.reason, "uri": where,
                                       "fallback_step": loaded.step if loaded is not None else None}))
    ray.get(waits, timeout=60)
