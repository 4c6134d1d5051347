"""Silent data corruption between data-parallel replicas: they must hold bit-identical weights
and optimizer state. Every health.sdc_check_every steps each rank sums the bit patterns of its
parameters and optimizer state (exact: any flipped bit changes it), the ranks all-gather the
sums (one small collective), and ranks that disagree with the majority are named.

FSDP shards differ by design: there the check is skipped (a shard's checksum would have to be
recomputed on a peer holding the same shard; not done yet).
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from common.errors import SilentCorruption

INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
          torch.float16: torch.int16}


def checksum(tensors) -> int:
    """The sum of the bit patterns of every element, as an exact integer (mod 2**63)."""
    total = 0
    for t in tensors:
        t = t.detach()
        if hasattr(t, "to_local"):
            t = t.to_local()
        as_int = t.view(INT_OF[t.dtype]) if t.dtype in INT_OF else t
        total += int(as_int.sum(dtype=torch.int64))
    return total % (2**63)


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    yield from model.parameters()
    if optimizer is not None:
        for state in optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def minority(sums: list[int]) -> list[int]:
    """Ranks whose checksum differs from the most common one; every rank when none is a majority."""
    counts = collections.Counter(sums)
    value, n = counts.most_common(1)[0]
    if n * 2 <= len(sums):  # no majority (2 ranks, or a split): every rank is a suspect
        return list(range(len(sums)))
    return [r for r, s in enumerate(sums) if s != value]


def check(model, optimizer, *, step: int, device) -> None:
    """Raise SilentCorruption when the replicas disagree (a collective: every rank calls it)."""
    mine = torch.tensor([checksum(state_tensors(model, optimizer))], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    sums = [int(g.item()) for g in gathered]
    if len(set(sums)) > 1:
        raise SilentCorruption(step, minority(sums), sums)
