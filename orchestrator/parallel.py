"""Data parallelism for one model, and the two contexts a training step needs around it.

    model = wrap_model(model, strategy=Strategy.FSDP, device=device, world_size=world_size)
    optimizer = ...                       # after wrapping: FSDP replaces the parameters
    for i, micro in enumerate(micro_batches):
        with grad_sync(model, i == len(micro_batches) - 1), autocast(device, Precision.BF16):
            loss = ...
        loss.backward()                   # (inside grad_sync too: that is where DDP reduces)

Strategies (`parallelism.strategy`):
- `ddp`: torch DistributedDataParallel; every rank holds the whole model and optimizer state,
  gradients are all-reduced in backward. Checkpoints are replicated (written once, by rank 0).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`); every rank holds 1/world_size of each
  parameter, its gradient and its optimizer state; a unit's parameters are all-gathered for its
  forward and backward and gradients reduce-scattered after. Checkpoints are sharded (DCP).

FSDP units, i.e. which modules get their own `fully_shard` (their own all-gather) before the
root takes the rest:
1. `model.fsdp_units`, when the model defines it (a list of submodules), else
2. every element of each outermost `nn.ModuleList` in the model (the repeated transformer blocks:
   `model.blocks`, `model.transformer.h`, `model.layers`, ...), else
3. none: the root is the only unit (the whole model is gathered for forward; gradients and
   optimizer state are still sharded).
Units must not share parameters with each other or with the root (tied embeddings stay in the
root, as in the built-in GPT). One rank: nothing to shard or reduce, the model is used as is.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common.errors import ConfigError
from orchestrator.config import Precision, Strategy


def wrap_model(model: nn.Module, *, strategy: Strategy, device: torch.device, world_size: int,
               compile: bool = False, async_grads: bool = False) -> nn.Module:
    """`model` on `device`, wrapped per `strategy`: a DDP wrapper (the model is `.module`), or the
    model itself turned into an FSDP module (parameters become sharded DTensors). Build the
    optimizer from the returned module's parameters. `compile`: torch.compile the model's forward
    in place (state-dict keys stay the same, so checkpoints do not change). `async_grads` (ddp
    only): no DDP wrapper; the caller reduces gradients with AsyncGradReduce."""
    strategy = Strategy(strategy)
    model = model.to(device)
    distributed = world_size > 1 and dist.is_initialized()
    if distributed and strategy == Strategy.FSDP:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        for unit in fsdp_units(model):  # inner units first: fully_shard goes bottom-up
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if compile:
        _check_compiler(device)
        model.compile()
    if distributed and strategy == Strategy.DDP and async_grads:
        for t in model.state_dict().values():  # what DDP does at construction: rank 0's weights everywhere
            dist.broadcast(t, 0)
    elif distributed and strategy == Strategy.DDP:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


class AsyncGradReduce:
    """`distributed.async_collectives`, a test mode: on gloo, the gradient all-reduce behaves as
    DDP's does on CUDA when seen from the host. It is issued after backward without waiting
    (`async_op=True`) and waited for only at the optimizer step, so the host runs ahead of the
    collective into another phase. CPU tests can then check that the hang watchdog counts a
    collective done when it completes, not when the host passes it (orchestrator/hang/health.py).
    Gradients are averaged as DDP's are (divided by the world size, then summed), in one bucket."""

    def __init__(self, model: nn.Module, world_size: int):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world_size = world_size
        self._flat: torch.Tensor | None = None
        self._work = None

    def issue(self):
        """After the last backward of a step; returns the torch Work (for completes_later)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)
        self._work = dist.all_reduce(self._flat, async_op=True)
        return self._work

    def wait(self) -> None:
        """Before anything reads the gradients (clipping, the optimizer)."""
        self._work.wait()
        offset = 0
        for p in self.params:
            averaged = self._flat[offset:offset + p.numel()].view_as(p)
            p.grad = averaged.clone() if p.grad is None else p.grad.copy_(averaged)
            offset += p.numel()
        self._flat = self._work = None


def _check_compiler(device: torch.device) -> None:
    """Inductor builds C++ for CPU kernels: without a compiler it fails at the first forward,
    deep in a traceback; say so up front instead."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        raise ConfigError("train.compile=true: torch.compile (inductor) needs a C++ compiler on CPU and none was "
                          "found (install g++ or set CXX), or set train.compile=false")


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that get their own fully_shard (see the module docstring), in order."""
    declared = getattr(model, "fsdp_units", None)
    if declared is not None:
        units = list(declared)
        bad = [type(u).__name__ for u in units if not isinstance(u, nn.Module) or u is model]
        if bad:
            raise ConfigError(f"{type(model).__name__}.fsdp_units: expected submodules of the model, got {bad[0]}")
        return units
    units: list[nn.Module] = []
    inside: set[int] = set()  # modules under an already chosen ModuleList
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            inside |= {id(m) for m in module.modules()}
            units += [m for m in module if any(True for _ in m.parameters())]
    return units


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (an FSDP module is its own)."""
    return model.module if isinstance(model, DDP) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are sharded DTensors (FSDP2)."""
    tensor = sys.modules.get("torch.distributed.tensor")  # not loaded: there is no DTensor
    return tensor is not None and any(isinstance(p, tensor.DTensor) for p in unwrap(model).parameters())


@contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Gradient reduction across ranks on (the last micro-batch of an optimizer step) or off (the
    others: gradients accumulate locally, with no collective in backward). Put forward and
    backward inside: DDP reads the flag in forward, FSDP in backward."""
    if enabled:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def autocast(device: torch.device, precision: Precision):
    """Mixed precision for forward and loss: bf16 autocast (CPU too); weights, gradients and the
    optimizer stay fp32. fp32: nothing."""
    if Precision(precision) == Precision.BF16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
