"""What a checkpoint holds and how its files are named and encoded.

One folder per checkpoint, `step_00000100/` (100 optimizer steps done; training resumes at loop
index 100). Files are torch-serialized dicts of tensors and plain values, loaded with
`torch.load(weights_only=True)`: no arbitrary unpickling, so a bucket is never a code source.

    model.pt           replicated DDP weights, written once by rank 0
    optim.pt           replicated optimizer state (AdamW moments + param groups), rank 0
    meta.pt            step, run id, world size, resolved (redacted) config as JSON text, rank 0
    rank_00003.pt      what only rank 3 has: RNG states (python, numpy, torch) and sampler state
    MANIFEST.json      written last: every file above with its size and sha256

A sharded (FSDP/DCP-style) state would add `model.shard_00003.pt` files from each rank; the
manifest lists files with their kind and rank, so the commit protocol does not change.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
MODEL, OPTIM, META = "model.pt", "optim.pt", "meta.pt"


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def parse_step_dir(name: str) -> int | None:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith("step_") and base[5:].isdigit():
        return int(base[5:])
    return None


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def to_host(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU memory: the only part of a save that blocks
    training. Afterwards the training step may change the originals freely."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_host(v) for v in obj)
    return obj


def plain(obj: Any) -> Any:
    """numpy scalars and arrays to Python numbers and tensors: what weights_only can load back."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a weights_only-loadable form (tensors, ints, lists)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(*, step: int, rank: int, world_size: int, run_id: str, model: torch.nn.Module | None,
            optimizer: torch.optim.Optimizer | None, sampler_state: dict, config: dict) -> dict[str, Any]:
    """name -> host copy of what this rank writes. Replicated state only on rank 0."""
    files: dict[str, Any] = {
        rank_file(rank): {"rank": rank, "world_size": world_size, "step": step, "rng": rng_state(),
                          "sampler": plain(dict(sampler_state))},
    }
    if rank == 0:
        if model is not None:
            files[MODEL] = to_host(model.state_dict())
        if optimizer is not None:
            files[OPTIM] = to_host(optimizer.state_dict())
        files[META] = {"format": FORMAT_VERSION, "step": step, "run_id": run_id, "world_size": world_size,
                       "config_json": json.dumps(config)}
    return files


def encode(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def decode(data: bytes) -> Any:
    """Never unpickles arbitrary objects: only tensors and plain containers are accepted."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
