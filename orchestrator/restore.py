"""Putting a checkpoint back into a rank's objects, so a resumed run continues bit for bit."""

from __future__ import annotations

import torch

from orchestrator.errors import ConfigError


def restore_state(loaded, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler, seed: int,
                  rank: int, world_size: int, data_step=lambda step: step) -> int:
    """Load model, optimizer, sampler position and this rank's RNG streams from `loaded` (a
    checkpointing.loader.LoadedCheckpoint). Returns the step to run next. `data_step` maps an
    optimizer step to its global batch (they differ once batches were skipped)."""
    from checkpointing.format import set_rng_state

    try:
        model.load_state_dict(loaded.model)
    except RuntimeError as e:  # a different model shape than the checkpoint's
        first = str(e).strip().splitlines()
        raise ConfigError(f"checkpoint {loaded.uri} does not fit this model: {first[1].strip() if len(first) > 1 else first[0]}") from None
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


def _sampler_state_from_meta(loaded, sampler, batch: int) -> dict:
    saved = loaded.meta.get("config", {}).get("data", {}).get("global_batch_size", sampler.global_batch_size)
    state = sampler.state_dict(batch)
    state["global_batch_size"] = saved
    state["samples_consumed"] = batch * saved
    return state
