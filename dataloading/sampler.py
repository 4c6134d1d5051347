"""Deterministic global-batch sampler with O(1) resume and O(batch) memory.

Each epoch orders all N sequences by a keyed permutation that is a pure function of
(seed, epoch, N, mode): position p of the epoch holds sequence `order(p)`. Global batch k of the
epoch is positions [k*B, (k+1)*B); rank r of W gets the contiguous slice [r*B/W, (r+1)*B/W) of it.
Nothing depends on W, so any W dividing B sees exactly the same global batches.

Tail rule: an epoch has N // B batches. The last N mod B positions of each epoch are skipped;
since the order changes every epoch, a different random set of sequences is skipped each time.
No sequence appears twice within an epoch.

Modes (see ShuffleMode): GLOBAL permutes all N positions. BLOCK cuts [0, N) into blocks of
`block_size` consecutive ids (the last may be shorter), permutes the block order, groups the
shuffled blocks into windows of `window_blocks`, and permutes the positions within each window.
A window touches `window_blocks` blocks, so with blocks = shards a node needs only the current
and next window's shards on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch.utils.data

from common.errors import ConfigError, DataError
from dataloading.config import ShuffleMode
from dataloading.permutation import Permutation, round_keys

STATE_VERSION = 1
TABLE_BLOCKS = 1 << 16


class GlobalOrder:
    """Full shuffle: position -> sequence id through one permutation of [0, N)."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.perm = Permutation(n, round_keys("global", seed, epoch))

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self.perm(positions)

    def span(self, first: int, count: int) -> np.ndarray:
        """Ids at positions first, ..., first + count - 1 (what a rank's batch asks for)."""
        return self.perm.span(first, count)


class BlockOrder:
    """Block shuffle: permuted blocks, then a permutation within each window of blocks."""

    def __init__(self, n: int, seed: int, epoch: int, *, block_size: int, window_blocks: int):
        self.n, self.bs, self.w = n, block_size, window_blocks
        self.seed, self.epoch = seed, epoch
        self.nb = -(-n // block_size)
        self.blocks = Permutation(self.nb, round_keys("blocks", seed, epoch))
        self.short = self.nb * block_size - n  # the last block is this much shorter
        # slot (shuffled place) of the short block; positions after it shift back by `short`
        self.short_slot = int(self.blocks.inverse([self.nb - 1])[0]) if self.short else self.nb
        # a block order of <= 65536 blocks is cheaper to look up than to recompute (<= 512 KB, ~3 ms once)
        self._table = self.blocks(np.arange(self.nb)) if self.nb <= TABLE_BLOCKS else None
        self._windows: dict[int, tuple[Permutation, int, int, np.ndarray | None]] = {}

    def block_at(self, slots: np.ndarray) -> np.ndarray:
        """Block id at each shuffled slot."""
        return self._table[slots] if self._table is not None else self.blocks(slots)

    def slot_start(self, slot):
        slot = np.asarray(slot, dtype=np.int64)
        return slot * self.bs - self.short * (slot > self.short_slot)

    def locate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slot, offset within its block) of epoch positions p."""
        t, bs = self.short_slot, self.bs
        if not self.short:
            slot = p // bs
            return slot, p - slot * bs
        slot = np.where(p < t * bs, p // bs, np.where(p < (t + 1) * bs - self.short, t, (p + self.short) // bs))
        return slot, p - self.slot_start(slot)

    def _window(self, window: int) -> tuple[Permutation, int, int, np.ndarray | None]:
        """(permutation, first position, end position, delta) of a window. Where the window's
        j-th slot holds local positions [j*bs, (j+1)*bs) (every window but the one holding the
        short block followed by more slots), id = local + delta[local // bs]; else delta is None."""
        got = self._windows.get(window)
        if got is None:
            first_slot = window * self.w
            end_slot = min(first_slot + self.w, self.nb)
            start, end = int(self.slot_start(first_slot)), int(self.slot_start(end_slot))
            perm = Permutation(end - start, round_keys("window", self.seed, self.epoch, window))
            delta = None
            if end_slot - 1 <= self.short_slot or first_slot > self.short_slot:
                slots = np.arange(first_slot, end_slot, dtype=np.int64)
                delta = self.block_at(slots) * self.bs - self.slot_start(slots) + start
            if len(self._windows) > 64:  # a batch spans one or two windows; keep the dict small
                self._windows.clear()
            got = self._windows[window] = (perm, start, end, delta)
        return got

    def window_perm(self, window: int) -> Permutation:
        return self._window(window)[0]

    def _window_at(self, p: int) -> int:
        """Window of one position (integer arithmetic, no arrays)."""
        t, bs = self.short_slot, self.bs
        if p < t * bs:
            slot = p // bs
        elif p < (t + 1) * bs - self.short:
            slot = t
        else:
            slot = (p + self.short) // bs
        return slot // self.w

    def window_blocks_of(self, window: int) -> np.ndarray:
        """Block ids (in shuffled order) of window `window`, empty past the end."""
        slots = np.arange(window * self.w, min((window + 1) * self.w, self.nb), dtype=np.int64)
        return self.block_at(slots) if slots.size else slots

    def window_of(self, p: np.ndarray) -> np.ndarray:
        return self.locate(p)[0] // self.w

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        if positions.size == 0:
            return positions.copy()
        windows = self.window_of(positions)
        lo, hi = int(windows.min()), int(windows.max())
        if lo == hi:  # the usual case: the whole batch inside one window
            start = int(self.slot_start(lo * self.w))
            mixed = start + self.window_perm(lo)(positions - start)
        else:
            mixed = np.empty_like(positions)
            for w in np.unique(windows):
                sel = windows == w
                start = int(self.slot_start(int(w) * self.w))
                mixed[sel] = start + self.window_perm(int(w))(positions[sel] - start)
        slot, offset = self.locate(mixed)
        return self.block_at(slot) * self.bs + offset

    def span(self, first: int, count: int) -> np.ndarray:
        """Ids at positions first, ..., first + count - 1, window by window: `self(arange)`
        without re-deriving every position's window and block."""
        if first < 0 or count < 0 or first + count > self.n:
            raise IndexError(f"positions [{first}, {first + count}) out of range [0, {self.n})")
        if count == 0:
            return np.empty(0, dtype=np.int64)
        parts = []
        for window in range(self._window_at(first), self._window_at(first + count - 1) + 1):
            perm, start, end, delta = self._window(window)
            lo, hi = max(first, start), min(first + count, end)
            local = perm.span(lo - start, hi - lo)
            if delta is not None:
                ids = delta.take(local // self.bs)
                ids += local
            else:
                slot, offset = self.locate(local + start)
                ids = self.block_at(slot) * self.bs + offset
            parts.append(ids)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def check_world_size(global_batch_size: int, world_size: int) -> None:
    """ConfigError unless world_size ranks can share global batches of global_batch_size equally."""
    if world_size < 1 or global_batch_size % world_size:
        raise ConfigError(
            f"data.global_batch_size={global_batch_size} must be divisible by the world size "
            f"{world_size} (scaling.num_workers): every rank takes an equal slice of each global batch"
        )


class GlobalSampler:
    """Global batches by step; `on_step(step)` (optional) is told which step a rank asks for."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        *,
        mode: ShuffleMode | str = ShuffleMode.GLOBAL,
        block_size: int = 0,
        window_blocks: int = 4,
        on_step: Callable[[int], None] | None = None,
    ):
        mode = ShuffleMode(mode)
        if mode is ShuffleMode.AUTO:
            raise ValueError("resolve ShuffleMode.AUTO before building a GlobalSampler (TokenDataset.sampler does)")
        if global_batch_size < 1:
            raise ConfigError(f"data.global_batch_size must be at least 1, got {global_batch_size}")
        if num_samples < global_batch_size:
            raise DataError(
                f"dataset has {num_samples} sequences, fewer than one global batch of {global_batch_size} "
                "(lower data.global_batch_size or add data)"
            )
        if mode is ShuffleMode.BLOCK and block_size < 1:
            raise ConfigError(f"block shuffle needs data.block_size >= 1, got {block_size}")
        if window_blocks < 1:
            raise ConfigError(f"data.window_blocks must be at least 1, got {window_blocks}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.mode = mode
        self.block_size = block_size if mode is ShuffleMode.BLOCK else 0
        self.window_blocks = window_blocks if mode is ShuffleMode.BLOCK else 0
        self.batches_per_epoch = num_samples // global_batch_size
        self.on_step = on_step
        self._orders: dict[int, GlobalOrder | BlockOrder] = {}

    def order(self, epoch: int) -> GlobalOrder | BlockOrder:
        """The epoch's position -> sequence id map (the last two epochs used are cached, since
        lookahead near an epoch's end also asks for the next one)."""
        got = self._orders.pop(epoch, None)
        if got is None:
            if self.mode is ShuffleMode.BLOCK:
                got = BlockOrder(self.num_samples, self.seed, epoch,
                                 block_size=self.block_size, window_blocks=self.window_blocks)
            else:
                got = GlobalOrder(self.num_samples, self.seed, epoch)
            if len(self._orders) >= 2:
                del self._orders[next(iter(self._orders))]  # least recently used
        self._orders[epoch] = got  # (re)inserted last = most recently used
        return got

    def _ids(self, step: int, start: int, count: int) -> np.ndarray:
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.batches_per_epoch)
        return self.order(epoch).span(k * self.global_batch_size + start, count)

    def global_batch(self, step: int) -> np.ndarray:
        """The sequence ids of global batch `step` (0-based, counting across epochs), as int64."""
        return self._ids(step, 0, self.global_batch_size)

    def local_batch(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """This rank's contiguous slice of global batch `step`."""
        check_world_size(self.global_batch_size, world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} out of range for world size {world_size}")
        if self.on_step is not None:
            self.on_step(step)
        per = self.global_batch_size // world_size
        return self._ids(step, rank * per, per)

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    # --- resumable state -------------------------------------------------------------------

    def state_dict(self, step: int) -> dict:
        """Tiny state after `step` global batches were consumed (step = the next step to run)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch_of(step),
            "samples_consumed": step * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "num_samples": self.num_samples,
            "mode": self.mode.value,
            "block_size": self.block_size,
            "window_blocks": self.window_blocks,
        }

    def load_state_dict(self, state: dict, *, world_size: int | None = None) -> int:
        """Check `state` continues this sampler's sequence; return the step to run next.

        Raises ConfigError if the global batch size, seed or shuffle settings changed, or the
        world size does not divide the global batch; DataError if the dataset size changed.
        """
        if not isinstance(state, dict) or "samples_consumed" not in state:
            raise DataError(f"sampler state is not a dict with samples_consumed: {state!r}")
        b_old = int(state.get("global_batch_size", self.global_batch_size))
        if b_old != self.global_batch_size:
            raise ConfigError(
                f"data.global_batch_size changed from {b_old} (checkpoint) to {self.global_batch_size}: "
                f"the sample sequence continues exactly only with the same global batch size; "
                f"set data.global_batch_size={b_old} (any world size dividing it works)"
            )
        for key, option, mine in (("seed", "run.seed", self.seed), ("mode", "data.shuffle", self.mode.value),
                                  ("block_size", "data.block_size", self.block_size),
                                  ("window_blocks", "data.window_blocks", self.window_blocks)):
            if key in state and state[key] != mine:
                raise ConfigError(f"sampler {key} changed from {state[key]!r} (checkpoint) to {mine!r}; "
                                  f"set {option}={state[key]} to continue the same sample sequence")
        n_old = state.get("num_samples", self.num_samples)
        if n_old != self.num_samples:
            raise DataError(f"the dataset changed: the checkpoint's sampler saw {n_old} sequences, this one has "
                            f"{self.num_samples}; resume with the same dataset")
        consumed = int(state["samples_consumed"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise DataError(f"sampler state: samples_consumed={consumed} is not a multiple of the global batch "
                            f"{self.global_batch_size}")
        step = consumed // self.global_batch_size
        if "epoch" in state and int(state["epoch"]) != self.epoch_of(step):
            raise DataError(f"sampler state: epoch {state['epoch']} does not match samples_consumed={consumed} "
                            f"({self.batches_per_epoch} batches per epoch)")
        if world_size is not None:
            check_world_size(self.global_batch_size, world_size)
        return step

    @classmethod
    def from_state(cls, state: dict, *, world_size: int | None = None,
                   on_step: Callable[[int], None] | None = None) -> tuple[GlobalSampler, int]:
        """Rebuild the sampler from its state alone; returns (sampler, next step)."""
        try:
            sampler = cls(int(state["num_samples"]), int(state["global_batch_size"]), int(state["seed"]),
                          mode=state["mode"], block_size=int(state["block_size"]),
                          window_blocks=int(state["window_blocks"]) or 1, on_step=on_step)
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"sampler state is incomplete or malformed ({type(e).__name__}: {e}): {state!r}") from None
        return sampler, sampler.load_state_dict(state, world_size=world_size)


class DistributedGlobalSampler(torch.utils.data.Sampler):
    """A `torch.utils.data.Sampler` over this rank's sequence ids, for users' own loops.

    Iterating yields the rank's ids of each global batch in turn, from the current position to the
    end of the current epoch (the tail rule applies), then moves to the next epoch. Use it with
    `DataLoader(ds, batch_size=global_batch_size // world_size, sampler=...)`. `state_dict()`
    counts the global batches handed out; with DataLoader workers prefetching ahead of your loop,
    save `state_dict(step)` with your own step counter instead.
    """

    def __init__(self, dataset_len: int, global_batch_size: int, seed: int = 0, *, rank: int = 0,
                 world_size: int = 1, mode: ShuffleMode | str = ShuffleMode.GLOBAL, block_size: int = 0,
                 window_blocks: int = 4):
        check_world_size(global_batch_size, world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} out of range for world size {world_size}")
        self.sampler = GlobalSampler(dataset_len, global_batch_size, seed, mode=mode, block_size=block_size,
                                     window_blocks=window_blocks)
        self.rank, self.world_size = rank, world_size
        self.step = 0  # next global batch to hand out

    def set_epoch(self, epoch: int) -> None:
        """Start at the first batch of `epoch` (a no-op if already inside it)."""
        if self.sampler.epoch_of(self.step) != epoch:
            self.step = epoch * self.sampler.batches_per_epoch

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch * (self.sampler.global_batch_size // self.world_size)

    def __iter__(self):
        end = (self.sampler.epoch_of(self.step) + 1) * self.sampler.batches_per_epoch
        while self.step < end:
            ids = self.sampler.local_batch(self.step, self.rank, self.world_size)
            self.step += 1  # counted when handed out: after the last id, the batch is consumed
            yield from ids.tolist()

    def state_dict(self, step: int | None = None) -> dict:
        return self.sampler.state_dict(self.step if step is None else step)

    def load_state_dict(self, state: dict) -> None:
        self.step = self.sampler.load_state_dict(state, world_size=self.world_size)


def batch_fingerprint(ids: np.ndarray) -> int:
    """Stable 52-bit hash of a global batch's sample ids (exact as a float64 metric value)."""
    digest = hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 12
