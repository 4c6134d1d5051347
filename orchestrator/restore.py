"""Putting a checkpoint back into a rank's objects, so a resumed run continues bit for bit.

Weights and optimizer state load across strategies and world sizes: a replicated checkpoint
(DDP) into a DDP model as it is, or into an FSDP model (each rank keeps its slice); a sharded one
(FSDP, DCP) into an FSDP model of any world size, or whole into a DDP model; a sharded in-memory
snapshot into an FSDP model of the same world size.
"""

from __future__ import annotations

import torch

from checkpointing import memory, templates
from checkpointing.format import set_rng_state
from checkpointing.loader import read_sharded
from common.errors import ConfigError
from orchestrator.parallel import is_sharded


def restore_state(loaded, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler, seed: int,
                  rank: int, world_size: int, data_step=lambda step: step) -> int:
    """Load model, optimizer, sampler position and this rank's RNG streams from `loaded` (a
    checkpointing.loader.LoadedCheckpoint). Returns the step to run next. `data_step` maps an
    optimizer step to its global batch (they differ once batches were skipped)."""
    try:
        if isinstance(loaded, memory.LoadedSnapshot):
            _load_snapshot(loaded, model, optimizer)
        elif loaded.sharded:
            _load_sharded(loaded, model, optimizer)
        elif is_sharded(model):
            _load_whole_into_sharded(loaded, model, optimizer)
        else:
            model.load_state_dict(loaded.model)
    except (RuntimeError, KeyError, ValueError) as e:  # a different model shape than the checkpoint's
        first = str(e).strip().splitlines()
        raise ConfigError(f"checkpoint {loaded.uri} does not fit this model: {first[1].strip() if len(first) > 1 else first[0]}") from None
    if not loaded.sharded and not is_sharded(model):
        optimizer.load_state_dict(loaded.optimizer)
    state = loaded.rank_state
    expected = data_step(loaded.step)
    if state is not None:
        batch = sampler.load_state_dict(state["sampler"], world_size=world_size)
        set_rng_state(state["rng"])
    else:  # a rank the saving run did not have (grown world): global sampler state, fresh RNG stream
        batch = sampler.load_state_dict(_sampler_state_from_meta(loaded, sampler, expected), world_size=world_size)
        torch.manual_seed(seed * 1000 + rank + 1 + loaded.step)
    if batch != expected:
        raise RuntimeError(f"checkpoint {loaded.uri} is for step {loaded.step} (global batch {expected}) "
                           f"but its sampler state says batch {batch}")
    return loaded.step


def _load_snapshot(loaded, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A sharded in-memory snapshot (same world size and mesh): this rank's slices, keyed as the
    module's and optimizer's own state dicts key them, copied into the tensors they hold."""
    templates.create_state(optimizer)  # a fresh optimizer: Adam's moments exist only after a step
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    memory.read_sharded(loaded, state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])


def _load_sharded(loaded, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """DCP re-slices every tensor for this rank's model, sharded over any world size or whole.
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)  # name-keyed; a fresh optimizer gets zero state first
    state = {"model": msd, "optim": osd}
    read_sharded(loaded, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _load_whole_into_sharded(loaded, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A replicated checkpoint (DDP, or one rank) into an FSDP model: every rank has the whole
    state and keeps its slice. The optimizer's state is keyed by parameter index there; torch's
    distributed state-dict API wants names."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, loaded.model, options=whole)
    set_optimizer_state_dict(model, optimizer, _by_name(loaded.optimizer, model, optimizer), options=whole)


def _by_name(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An index-keyed optimizer state dict (torch's own) keyed by parameter name instead. Indices
    count the parameters of the optimizer's groups in order, which this optimizer was built in."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise ValueError(f"the checkpoint's optimizer has {sum(len(g['params']) for g in saved['param_groups'])} "
                         f"parameters, this model {len(order)}")
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": {order[i]: s for i, s in saved["state"].items()}, "param_groups": groups}


def _sampler_state_from_meta(loaded, sampler, batch: int) -> dict:
    saved = loaded.meta.get("config", {}).get("data", {}).get("global_batch_size", sampler.global_batch_size)
    state = sampler.state_dict(batch)
    state["global_batch_size"] = saved
    state["samples_consumed"] = batch * saved
    return state
