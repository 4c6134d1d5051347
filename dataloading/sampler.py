"""Deterministic global-batch sampler.

The global order is a pure function of (seed, epoch) over all N sequences and never depends on
the number of ranks; each global batch is cut into equal contiguous slices, one per rank. Epochs
drop the tail (N mod global_batch_size sequences), so no sequence repeats within an epoch.
"""

from __future__ import annotations

import hashlib

import numpy as np


class GlobalSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples < global_batch_size:
            raise ValueError(f"dataset has {num_samples} sequences, fewer than one global batch of {global_batch_size}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.batches_per_epoch = num_samples // global_batch_size
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> np.ndarray:
        """The sequence ids of global batch `step` (0-based), as int64."""
        epoch, k = divmod(step, self.batches_per_epoch)
        b = self.global_batch_size
        return self._permutation(epoch)[k * b : (k + 1) * b].astype(np.int64)

    def local_batch(self, step: int, rank: int, world_size: int) -> np.ndarray:
        ids = self.global_batch(step)
        per = self.global_batch_size // world_size
        return ids[rank * per : (rank + 1) * per]

    def state_dict(self, step: int) -> dict:
        return {"seed": self.seed, "epoch": step // self.batches_per_epoch, "samples_consumed": step * self.global_batch_size}


def batch_fingerprint(ids: np.ndarray) -> int:
    """Stable 52-bit hash of a global batch's sample ids (exact as a float64 metric value)."""
    digest = hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 12
