"""One actor per rank: joins the process group, then runs the training loop."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from actors.health import Health, Heartbeat
from actors.metric_sender import MetricSender
from actors.system_stats import SystemSampler
from orchestrator import telemetry
from orchestrator.config import Backend, config_from_dict


class TrainWorker:
    def __init__(self, config: dict, metrics_actor, checkpoint_coordinator=None, health_monitor=None):
        self.cfg = config_from_dict(config)
        self.metrics_actor = metrics_actor
        self.health_monitor = health_monitor
        self.checkpoint_coordinator = checkpoint_coordinator
        self.rank = -1
        self.device = None

    def node_info(self) -> dict:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def setup(self, *, rank: int, local_rank: int, world_size: int, local_world_size: int, node_rank: int,
              master_addr: str, master_port: int) -> str:
        """Set the torch.distributed environment and join the process group. Returns the backend."""
        import torch
        import torch.distributed as dist

        env = {
            "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world_size,
            "LOCAL_WORLD_SIZE": local_world_size, "NODE_RANK": node_rank,
            "MASTER_ADDR": master_addr, "MASTER_PORT": master_port,
        }
        os.environ.update({k: str(v) for k, v in env.items()})
        if self.cfg.hang.enabled and self.cfg.hang.flight_recorder_entries:
            # read by torch when the process group is created; a user's own setting wins
            os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(self.cfg.hang.flight_recorder_entries))
        if master_addr.startswith("127.") and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # a loopback cluster: keep gloo off other interfaces
        self.rank = rank
        use_gpu = torch.cuda.is_available() and bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
        backend = self.cfg.distributed.backend
        if backend == Backend.AUTO:
            backend = Backend.NCCL if use_gpu else Backend.GLOO
        if backend == Backend.NCCL and not use_gpu:
            raise RuntimeError("distributed.backend=nccl but this worker has no GPU; use gloo or set scaling.gpus_per_worker")
        # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPUs, so its first visible device is ours.
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        from orchestrator.training import setup_torch

        setup_torch(self.cfg, rank)
        if world_size > 1:
            dist.init_process_group(
                backend.value,
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=self.cfg.distributed.timeout_s),
            )
        return backend.value

    def train(self, restore_step: int | None = None, restore_uri: str | None = None, skipped: list[int] = ()) -> dict:
        """Run the training loop; with `restore_step`, from the newest committed checkpoint at or
        below it that verifies (every rank reads every file, so all reach the same verdict), in
        the run's own checkpoint location or `restore_uri` (a fork's parent's)."""
        import torch.distributed as dist

        from orchestrator.training import WorkerContext, train

        sender = MetricSender(self.metrics_actor, self.rank, flush_every_s=self.cfg.telemetry.flush_every_s)
        ctx = WorkerContext(rank=self.rank, world_size=int(os.environ["WORLD_SIZE"]), device=self.device)
        checkpointer = None
        if self.checkpoint_coordinator is not None:
            from checkpointing.worker import make_checkpointer

            checkpointer = make_checkpointer(self.cfg, rank=self.rank, world_size=ctx.world_size,
                                             coordinator=self.checkpoint_coordinator)
        health = Health(self.rank)
        beats = Heartbeat(self.health_monitor, health, self.cfg.hang.heartbeat_s).start() if self.health_monitor else None
        health.phase = "checkpoint" if restore_step is not None else "start"
        loaded = self._load(checkpointer, restore_step, restore_uri) if restore_step is not None else None
        telemetry.attach(sender)
        sampler = SystemSampler(sender.log, self.cfg.telemetry.system_every_s).start()
        try:
            summary = train(self.cfg, ctx, sender, checkpointer=checkpointer, restore=loaded, skipped=list(skipped),
                            health=health)
        finally:
            sampler.stop()
            if beats:
                beats.stop()
            telemetry.attach(None)
            sender.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        return summary

    def _load(self, checkpointer, restore_step: int, restore_uri: str | None):
        import torch
        import torch.distributed as dist

        from checkpointing.loader import load_latest

        if restore_uri is not None:
            where = restore_uri
            loaded = load_latest(restore_uri, rank=self.rank, max_step=restore_step,
                                 storage_options=self.cfg.checkpoint.storage_options)
        elif checkpointer is not None:
            where = checkpointer.root
            loaded = load_latest(checkpointer.root, rank=self.rank, max_step=restore_step, fs=checkpointer.fs)
        else:
            raise RuntimeError("restoring needs the checkpoint coordinator")
        if loaded is None:
            raise RuntimeError(f"no checkpoint at or below step {restore_step} verifies in {where}")
        if dist.is_initialized():  # every rank must resume from the same step
            steps = torch.tensor([loaded.step, -loaded.step], dtype=torch.int64)
            dist.all_reduce(steps, op=dist.ReduceOp.MAX)
            if steps[0] != -steps[1]:
                raise RuntimeError(f"ranks disagree on the checkpoint to resume from ({-int(steps[1])}..{int(steps[0])})")
        return loaded
