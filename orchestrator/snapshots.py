"""In-memory snapshots (how they work: checkpointing/memory.py; the keepers that hold them:
actors/snapshot_keeper.py). Here: in a rank's process, the Snapshotter wired to its keeper and
the metrics actor, and the restore from a keeper; for the controller, `choose` (pure: no Ray, no
torch), which snapshot a restarted group restores."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from orchestrator.config import Config

FETCH_TIMEOUT_S = 120.0


def snapshotter(cfg: Config, to: dict, member, sender, metrics):
    """to: {"keepers": [(node id, actor handle)] (its own node's first), "attempt": n, "run_id"},
    from the worker group."""
    import ray

    from checkpointing.client import RayClient
    from checkpointing.memory import Snapshotter

    def report(kind: str, severity: str, message: str, step: int, data: dict) -> None:
        print(message, file=sys.stderr, flush=True)
        try:
            ray.get(metrics.alert.remote(kind, severity, message, step=step, rank=member.rank, data=data), timeout=30)
        except Exception:  # the metrics actor restarts: the line above is still in the rank's log
            pass

    def stage(parts: list):  # one copy into the object store, which every keeper reads
        return ray.put(parts) if len(to["keepers"]) > 1 else parts

    c = cfg.checkpoint
    return Snapshotter(every_steps=c.memory_every_steps, limit_bytes=int(c.memory_limit_mb * 2**20), rank=member.rank,
                       world_size=member.world_size, run_id=to["run_id"], attempt=to["attempt"],
                       keepers=[(node[:12], RayClient(k, timeout_s=FETCH_TIMEOUT_S)) for node, k in to["keepers"]],
                       report=report, flush=sender.flush, stage=stage)


def restore(source: dict, *, rank: int, metrics):
    """This rank's snapshot of source["step"] from a keeper holding it ({"step", "holders": per
    rank [(node id, keeper handle or None: gone since)]}; the one on this rank's node first), or
    None when any rank cannot get its own: then every rank falls back to the durable checkpoint
    together."""
    import ray
    import torch
    import torch.distributed as dist

    from checkpointing.memory import as_loaded, first_line

    step, here = source["step"], ray.get_runtime_context().get_node_id()
    holders = sorted(source["holders"][rank], key=lambda h: h[0] != here)  # a local copy is the fastest read
    loaded, errors = None, []
    for node, keeper in holders:
        try:
            if keeper is None:
                raise LookupError(f"the keeper on node {node[:12]} is gone")
            data = ray.get(keeper.get.remote(rank, step), timeout=FETCH_TIMEOUT_S)
            loaded = as_loaded(data, where=f"memory://{node[:12]}/rank{rank}/step{step}")
            break
        except Exception as e:  # its keeper died since the controller chose it, a timeout: the next copy
            errors.append(f"node {node[:12]}: {first_line(e)}")
    error = "; ".join(errors) if loaded is None else None
    ok = torch.tensor([0 if loaded is None else 1], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if int(ok[0]) == 1:
        return loaded
    if error is not None:  # the rank that could not: says why; every rank falls back
        msg = f"rank {rank}: its snapshot of step {step} could not be read ({error}); restoring the durable checkpoint"
        print(msg, file=sys.stderr, flush=True)
        ray.get(metrics.alert.remote("snapshot_fallback", "warning", msg, step=step, rank=rank,
                                     data={"step": step, "why": error}), timeout=60)
    return None


# --- choosing what to restore ------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    step: int | None  # None: restore from the durable checkpoint
    holders: dict[int, tuple[str, ...]]  # rank -> node ids of the keepers that have its snapshot of `step`
    why: str  # why not, when step is None


def choose(inventory: dict[str, list[dict]], *, world_size: int, durable_step: int | None,
           at_most: int | None = None) -> Choice:
    """The newest step for which every rank of a group of `world_size` has a snapshot in a live
    keeper (`inventory`: node id -> its snapshots, {"rank", "step", "world_size"}), if it is not
    older than `durable_step` (the same step reads quicker from memory than from storage) and not
    above `at_most`."""
    have: dict[int, dict[int, list[str]]] = {}  # step -> rank -> nodes
    sizes = set()
    for node, snaps in sorted(inventory.items()):
        for s in snaps:
            sizes.add(s["world_size"])
            if s["world_size"] == world_size:
                have.setdefault(s["step"], {}).setdefault(s["rank"], []).append(node)
    if not any(inventory.values()):
        return Choice(None, {}, "no snapshot survived")
    if not have:
        return Choice(None, {}, f"the snapshots are of {'/'.join(map(str, sorted(sizes)))} ranks, "
                                f"this group has {world_size}: a snapshot restores only onto the world size that "
                                "took it (an FSDP rank's holds only its own shards; a durable checkpoint re-slices)")
    complete = [s for s, ranks in have.items() if len(ranks) == world_size and (at_most is None or s <= at_most)]
    if not complete:
        newest = {r: max(s for s, ranks in have.items() if r in ranks) for r in sorted({r for v in have.values() for r in v})}
        missing = sorted(set(range(world_size)) - set(newest))
        detail = (f"rank(s) {', '.join(map(str, missing))} have none left" if missing else
                  "newest per rank: " + ", ".join(f"rank {r} step {s}" for r, s in newest.items()))
        if at_most is not None:
            detail += f"; only steps <= {at_most} may be used"
        return Choice(None, {}, f"no step has a surviving snapshot of every rank ({detail})")
    step = max(complete)
    if durable_step is not None and step < durable_step:  # the same step: memory, the quicker read
        return Choice(None, {}, f"the newest complete snapshot (step {step}) is older than the durable "
                                f"checkpoint (step {durable_step})")
    return Choice(step, {r: tuple(nodes) for r, nodes in sorted(have[step].items())}, "")
