"""Building a rank's Checkpointer inside a Ray worker, from the coordinator handle."""

from __future__ import annotations

from checkpointing.client import RayClient
from checkpointing.storage import open_fs
from checkpointing.writer import Checkpointer


def make_checkpointer(cfg, *, config: dict, rank: int, world_size: int, coordinator, flush=lambda: None) -> Checkpointer:
    """cfg: the run's CheckpointConfig; config: the run's whole config as stored with each
    checkpoint (secrets already redacted); coordinator: the CheckpointCoordinator actor handle;
    flush: delivers the rank's buffered metrics (before its part of a checkpoint is reported)."""
    import ray

    client = RayClient(coordinator)
    info = client.call("join", rank)  # also clears what this rank left behind before a restart
    fs, root = open_fs(info["uri"], cfg.storage_options)
    return Checkpointer(fs=fs, root=root, client=client, rank=rank, world_size=world_size, run_id=info["run_id"],
                        config=config, cfg=cfg,
                        node=ray.get_runtime_context().get_node_id(), flush=flush)
