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
               compile: bool = False) -> nn.Module:
    """`model` on `device`, wrapped per `strategy`: a DDP wrapper (the model is `.module`), or the
    model itself turned into an FSDP module (parameters become sharded DTensors). Build the
    optimizer from the returned module's parameters. `compile`: torch.compile the model's forward
    in place (state-dict keys stay the same, so checkpoints do not change)."""
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
    if distributed and strategy == Strategy.DDP:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


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
