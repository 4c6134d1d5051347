"""Users' model factories for tests (imported inside Ray workers): one that fails on purpose,
one that logs per-layer figures through orchestrator.telemetry."""

from __future__ import annotations

import os
import time

import torch

from orchestrator import telemetry
from orchestrator.gpt import GPT


class FailsAtStep(GPT):
    """A GPT whose forward raises on one rank after a few training calls."""

    def __init__(self, *, fail_rank: int, fail_call: int, **kw):
        super().__init__(**kw)
        self.fail_rank, self.fail_call, self.calls = fail_rank, fail_call, 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.fail_call and int(os.environ["RANK"]) == self.fail_rank:
                raise RuntimeError(f"injected failure on call {self.calls}")
        return super().forward(idx)


def failing_gpt(*, vocab_size: int, block_size: int, fail_rank: int = 1, fail_call: int = 5):
    return FailsAtStep(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, d_model=32,
                       fail_rank=fail_rank, fail_call=fail_call)


class LogsPerLayer(GPT):
    """Logs one figure per parameter tensor (x `copies`) on every training forward."""

    def __init__(self, *, copies: int, **kw):
        super().__init__(**kw)
        self.copies = copies

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            figures = {}
            for name, p in self.named_parameters():
                norm = float(p.detach().norm())
                for c in range(self.copies):
                    figures[f"layers/{name}/norm{c}"] = norm
            telemetry.log(figures)
        return super().forward(idx)


def logging_gpt(*, vocab_size: int, block_size: int, copies: int = 1):
    return LogsPerLayer(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=32, copies=copies)


class Poisoned(GPT):
    """A GPT whose logits turn NaN on one particular batch (recognised by its first tokens)."""

    def __init__(self, *, poison: list[int], **kw):
        super().__init__(**kw)
        self.poison = torch.tensor(poison)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = super().forward(idx)
        if self.training and torch.equal(idx[0, : len(self.poison)], self.poison):
            logits = logits * float("nan")
        return logits


def poisoned_gpt(*, vocab_size: int, block_size: int, poison: list[int]):
    return Poisoned(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, d_model=32, poison=poison)


class Slow(GPT):
    """A GPT that takes at least `pause_s` per training step, without using CPU: keeps a fast
    machine from finishing a run before a test has done its part. Once the file `release_path`
    exists (the test has done it), the steps run at full speed."""

    def __init__(self, *, pause_s: float, slow_rank: int | None, eval_pause_s: float, release_path: str | None,
                 **kw):
        super().__init__(**kw)
        self.pause_s, self.slow_rank, self.eval_pause_s = pause_s, slow_rank, eval_pause_s
        self.release_path = release_path

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training and (self.slow_rank is None or int(os.environ["RANK"]) == self.slow_rank) \
                and not (self.release_path and os.path.exists(self.release_path)):
            time.sleep(self.pause_s)
        if not self.training:
            time.sleep(self.eval_pause_s)
        return super().forward(idx)


def slow_gpt(*, vocab_size: int, block_size: int, pause_s: float = 0.02, slow_rank: int | None = None,
             eval_pause_s: float = 0.0, dropout: float = 0.0, release_path: str | None = None):
    """slow_rank=None: every rank; else only that one (a straggler). eval_pause_s: per eval batch.
    release_path: no more pauses once this file exists."""
    return Slow(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, d_model=32, pause_s=pause_s,
                slow_rank=slow_rank, eval_pause_s=eval_pause_s, dropout=dropout, release_path=release_path)


class Hangs(GPT):
    """A GPT whose forward blocks on one rank at one call, as a rank stuck outside the collective
    the others wait in (a data-dependent deadlock, a stuck kernel)."""

    def __init__(self, *, hang_rank: int, hang_call: int, once_path: str | None, **kw):
        super().__init__(**kw)
        self.hang_rank, self.hang_call, self.once_path, self.calls = hang_rank, hang_call, once_path, 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.hang_call and int(os.environ["RANK"]) == self.hang_rank and self._first_time():
                for _ in range(3600):  # bounded: the controller kills this process long before
                    time.sleep(1)
        return super().forward(idx)

    def _first_time(self) -> bool:
        if self.once_path is None:
            return True
        try:
            with open(self.once_path, "x"):  # the restarted group finds it and does not hang again
                return True
        except FileExistsError:
            return False


def hanging_gpt(*, vocab_size: int, block_size: int, hang_rank: int = 1, hang_call: int = 8,
                once_path: str | None = None):
    """once_path: hang only the first time (a file marks it), so a restarted group can finish."""
    return Hangs(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, d_model=32,
                 hang_rank=hang_rank, hang_call=hang_call, once_path=once_path)


class HeldAt(GPT):
    """A GPT whose forward, on one rank at one training call of the first attempt, writes its Ray
    node's id to `at_path` and then waits (bounded) for the test to take that node away."""

    def __init__(self, *, hold_rank: int, hold_call: int, at_path: str, **kw):
        super().__init__(**kw)
        self.hold_rank, self.hold_call, self.at_path, self.calls = hold_rank, hold_call, at_path, 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if (self.calls == self.hold_call and int(os.environ["RANK"]) == self.hold_rank
                    and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
                import ray

                with open(self.at_path + ".tmp", "w") as f:
                    f.write(ray.get_runtime_context().get_node_id())
                os.replace(self.at_path + ".tmp", self.at_path)
                for _ in range(600):  # bounded: the node (and this process) is gone long before
                    time.sleep(1)
        return super().forward(idx)


def held_gpt(*, vocab_size: int, block_size: int, hold_rank: int = 1, hold_call: int = 15, at_path: str = ""):
    """The shape of bench.memory_snapshots:killed_gpt (so a run of either is the same run)."""
    return HeldAt(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=64, dropout=0.1,
                  hold_rank=hold_rank, hold_call=hold_call, at_path=at_path)


class Corrupts(GPT):
    """A GPT that, on one rank at one training forward, adds 1e-3 to one weight outside autograd:
    a bit of silent data corruption the replicas' checksums must catch."""

    def __init__(self, *, corrupt_rank: int, corrupt_call: int, once_path: str, **kw):
        super().__init__(**kw)
        self.corrupt_rank, self.corrupt_call, self.once_path, self.calls = corrupt_rank, corrupt_call, once_path, 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            rank = int(os.environ.get("RANK", "0"))
            if rank == self.corrupt_rank and self.calls == self.corrupt_call and not os.path.exists(self.once_path):
                open(self.once_path, "w").close()  # once per run: the restarted group must not repeat it
                with torch.no_grad():
                    next(self.parameters()).view(-1)[0] += 1e-3
        return super().forward(idx)


def corrupting_gpt(*, vocab_size: int, block_size: int, corrupt_rank: int, corrupt_call: int, once_path: str):
    return Corrupts(vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, d_model=32,
                    corrupt_rank=corrupt_rank, corrupt_call=corrupt_call, once_path=once_path)
