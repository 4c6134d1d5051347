"""Rendezvous in one place: which bundle gets which rank, where the master listens, and joining
the torch.distributed process group with torchrun's environment variables set, so code that
reads them (env:// init, LOCAL_RANK for the device) works unchanged.

`assign_ranks` runs in the driver; `free_port`, `join` and `leave` run in the rank's process.

A script run (entrypoint.script) gets torchrun's agent-store mode: for every attempt, rank 0's
worker hosts a fresh TCPStore server (`host_store`) before the scripts start, and the scripts get
TORCHELASTIC_USE_AGENT_STORE=True, so torch's env:// (and tcp://) rendezvous connects as a client
on every rank (torch/distributed/rendezvous.py `_create_c10d_store`). Without it, rank 0's script
creates the store and the others retry connecting with a back-off of 0.2-1 s until it listens;
and a store per attempt holds none of a dead attempt's keys (pytorch#135712). torch adds no
per-attempt prefix in this mode: a fresh server (a fresh port) is what separates attempts.
The built-in loop and functions join the group in `join`, where ranks other than 0 first wait
for rank 0's store to listen (`await_listening`, polled every 10 ms), which skips that back-off.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

from orchestrator.config import STALL_DIAGNOSIS_S, Backend, Config
from orchestrator.hang import nccl


def assign_ranks(bundle_nodes: list[str]) -> list[dict]:
    """Ranks for the bundles: ranks on one node are contiguous, nodes ordered by first bundle.
    Returns, per bundle, rank/local_rank/node_rank/local_world_size/node_id."""
    order = list(dict.fromkeys(bundle_nodes))
    out: list[dict] = [{} for _ in bundle_nodes]
    rank = 0
    for node_rank, node in enumerate(order):
        bundles = [i for i, n in enumerate(bundle_nodes) if n == node]
        for local_rank, bundle in enumerate(bundles):
            out[bundle] = {"rank": rank, "local_rank": local_rank, "node_rank": node_rank,
                           "local_world_size": len(bundles), "node_id": node}
            rank += 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Member:
    """This process's place in the group, once joined."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    backend: str
    device: object  # torch.device


_member: Member | None = None
_store = None  # this worker's hosted TCPStore server for the current attempt (host_store)


def member() -> Member:
    if _member is None:
        raise RuntimeError("this process has not joined a worker group (orchestrator.rendezvous.join)")
    return _member


def torchrun_env(*, rank: int, local_rank: int, world_size: int, local_world_size: int, node_rank: int,
                 master_addr: str, master_port: int, run_id: str, attempt: int, max_restarts: int,
                 agent_store: bool = False) -> dict[str, str]:
    """The variables torchrun (torch.distributed.elastic) sets for each worker."""
    env = {
        "RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": world_size, "LOCAL_WORLD_SIZE": local_world_size,
        "GROUP_RANK": node_rank, "NODE_RANK": node_rank, "ROLE_RANK": rank, "ROLE_WORLD_SIZE": world_size,
        "ROLE_NAME": "default", "MASTER_ADDR": master_addr, "MASTER_PORT": master_port,
        "TORCHELASTIC_RESTART_COUNT": attempt, "TORCHELASTIC_MAX_RESTARTS": max_restarts,
        "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_USE_AGENT_STORE": agent_store,
    }
    return {k: str(v) for k, v in env.items()}


def join(cfg: Config, *, rank: int, local_rank: int, world_size: int, local_world_size: int, node_rank: int,
         master_addr: str, master_port: int, run_id: str = "", attempt: int = 0, init_group: bool = True,
         node_ip: str | None = None, agent_store: bool = False) -> str:
    """Set the environment, choose the backend and device, join the process group (unless
    init_group is False: a script joins it itself, from the environment). agent_store: the
    store at master_addr:master_port is hosted for the group (host_store); the ranks are its
    clients. Returns the backend."""
    global _member
    import torch  # here, not at the top: the driver imports this module for assign_ranks
    import torch.distributed as dist

    os.environ.update(torchrun_env(rank=rank, local_rank=local_rank, world_size=world_size,
                                   local_world_size=local_world_size, node_rank=node_rank, master_addr=master_addr,
                                   master_port=master_port, run_id=run_id, attempt=attempt,
                                   max_restarts=cfg.fault_tolerance.max_restarts, agent_store=agent_store))
    if cfg.hang.enabled and cfg.hang.flight_recorder_entries:
        # read by torch when the process group is created; a user's own setting wins
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(cfg.hang.flight_recorder_entries))
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        # gloo otherwise binds to the address its hostname resolves to, often 127.0.x.1, which peers
        # on other nodes cannot reach: use the interface that carries this node's Ray address
        ifname = "lo" if master_addr.startswith("127.") else interface_of(node_ip)
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
    use_gpu = torch.cuda.is_available() and bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
    backend = cfg.distributed.backend
    if backend == Backend.AUTO:
        backend = Backend.NCCL if use_gpu else Backend.GLOO
    if backend == Backend.NCCL and not use_gpu:
        raise RuntimeError("distributed.backend=nccl but this worker has no GPU; use gloo or set scaling.gpus_per_worker")
    if backend == Backend.NCCL:  # before the group exists: torch reads them when it creates it
        budget = max(cfg.hang.timeout_s, cfg.hang.first_step_timeout_s) + STALL_DIAGNOSIS_S
        for key, value in nccl.diagnosis_env(trace_entries=cfg.hang.flight_recorder_entries if cfg.hang.enabled else 0,
                                             dump_dir=None, stall_budget_s=budget).items():
            os.environ.setdefault(key, value)
    # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPUs, so its first visible device is ours.
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    from orchestrator.training import setup_torch

    setup_torch(cfg, rank)
    if world_size > 1 and init_group:
        if rank != 0:  # torch's client backs off 0.2-0.6 s when it comes before rank 0's store listens
            await_listening(master_addr, master_port, cfg.distributed.timeout_s)
        dist.init_process_group(backend.value, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=cfg.distributed.timeout_s))
    _member = Member(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world_size,
                     node_rank=node_rank, backend=backend.value, device=device)
    return backend.value


def await_listening(addr: str, port: int, timeout_s: float, *, poll_s: float = 0.01) -> bool:
    """Wait until something accepts connections at addr:port (rank 0's store), at most timeout_s.
    False if nothing did: the caller goes on and torch reports the failure its own way."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, port), timeout=min(1.0, timeout_s)).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)


def host_store(master_addr: str, master_port: int, timeout_s: float) -> str | None:
    """In rank 0's worker: a fresh TCPStore server on master_port for this attempt (the previous
    attempt's is closed first), listening until `close_store` or the worker's end. Returns None,
    or why it could not be hosted (the scripts' rank 0 then hosts it, as without agent store)."""
    global _store
    close_store()
    try:
        from torch.distributed import TCPStore

        # not multi-tenant: torch would keep a multi-tenant server per port for the process's life
        _store = TCPStore(master_addr, master_port, None, True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, multi_tenant=False)
    except Exception as e:  # noqa: BLE001 (the port taken, no torch: the fallback, told by the caller)
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def close_store() -> None:
    """Stop this worker's hosted store, if any (its server's thread ends and the port is freed)."""
    global _store
    _store = None


def use_agent_store(on: bool) -> None:
    """Tell the scripts started from now on whether a store is hosted for them."""
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = str(on)


def interface_of(ip: str | None) -> str | None:
    """The name of the network interface holding address `ip`, if any."""
    if not ip:
        return None
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None


def leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
