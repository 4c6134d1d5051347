"""Templates for loading a sharded state (DCP) in place.

DCP cannot create a tensor: it fills the ones a template already holds, shaped the way this rank
wants them (a DTensor slice over any world size, or whole). A module in a template stands for its
state_dict() and an optimizer for its own; a fresh optimizer has no state yet (Adam's moments
appear at its first step), so it gets one step with zero gradients and a zero learning rate
first, which creates its state without changing a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Template:
    state: Any  # the structure DCP fills: containers copied, modules/optimizers as their state dicts
    objects: list[tuple[tuple, Any, dict]] = field(default_factory=list)  # (path, module/optimizer, its state dict)

    def load_objects(self) -> None:
        """Hand each module and optimizer its loaded state dict."""
        for _, obj, sd in self.objects:
            obj.load_state_dict(sd)


def template(into: Any) -> Template:
    """`into` with each module and optimizer replaced by its state dict. Dicts and lists are
    copied (DCP puts plain values into the copy); tensors are shared, so they fill in place."""
    t = Template(state=None)
    t.state = _walk(into, (), t.objects)
    return t


def _walk(obj: Any, path: tuple, objects: list) -> Any:
    if isinstance(obj, torch.nn.Module):
        sd = obj.state_dict()
        objects.append((path, obj, sd))
        return sd
    if isinstance(obj, torch.optim.Optimizer):
        create_state(obj)
        sd = obj.state_dict()
        objects.append((path, obj, sd))
        return sd
    if isinstance(obj, dict):
        return {k: _walk(v, (*path, k), objects) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, (*path, i), objects) for i, v in enumerate(obj)]
    return obj


def create_state(optimizer: torch.optim.Optimizer) -> None:
    """Give an optimizer without state its state (zeros), leaving parameters, gradients and
    learning rates as they were. A stateless one (plain SGD) stays stateless."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    grads = [p.grad for p in params]
    lrs = [g.get("lr") for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            if "lr" in g:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        with torch.no_grad():
            optimizer.step()
    finally:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        for g, lr in zip(optimizer.param_groups, lrs, strict=True):
            if lr is not None:
                g["lr"] = lr


def objects_in(into: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, module or optimizer) for each one in `into`, without touching them."""
    if isinstance(into, (torch.nn.Module, torch.optim.Optimizer)):
        return [(path, into)]
    if isinstance(into, dict):
        return [o for k, v in into.items() for o in objects_in(v, (*path, k))]
    if isinstance(into, list):
        return [o for i, v in enumerate(into) for o in objects_in(v, (*path, i))]
    return []


def at(state: Any, path: tuple) -> Any:
    """The value at `path` (keys and indices) in a nested state, or KeyError naming the path."""
    for i, key in enumerate(path):
        try:
            state = state[key]
        except (KeyError, IndexError, TypeError):
            raise KeyError(".".join(map(str, path[: i + 1]))) from None
    return state
