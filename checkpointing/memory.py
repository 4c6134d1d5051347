"""In-memory snapshots: every `checkpoint.memory_every_steps` steps each rank copies its whole
resumable state (weights, optimizer, sampler position, RNG streams, step) to host memory and
sends it to keepers (actors/snapshot_keeper.py), which outlive the rank. After
a failure the group restores from the newest step every rank has a surviving snapshot of, if it
is not older than the newest durable checkpoint (orchestrator/snapshots.py's `choose`).

The training thread only pays for the copy to host memory, into one flat buffer it reuses
(checkpointing/flat.py: why not torch.save); a background thread encodes a small header,
flushes the rank's metrics (so nothing before the snapshot's step is lost with the rank) and
sends header and buffer to each of the rank's keepers: the one on its own node (a killed rank
restores from there) and one on the next node (for when its own node is lost: the snapshots of
every rank must survive a node loss, not only those of the ranks on it). At most one snapshot is
in flight per rank: the next take() waits for the previous one.

A sharded state (FSDP2: DTensors) is snapshotted shard by shard: each rank copies only its own
slice of each tensor (the DTensor's local tensor), never a gathered whole. It restores onto the
same world size and mesh only, filled in place into the tensors the sharded model and its
optimizer already have (`read_sharded`); on another world size the controller falls back to the
durable (DCP) checkpoint, which re-slices.

Sizes are checked before anything is copied: a snapshot whose holdings would not fit
`memory_limit_mb` is skipped with a `snapshot_skipped` event, and the keeper refuses one its
node has no room for. Either way training goes on, with durable checkpoints only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from checkpointing import flat, format, loader
from checkpointing.background import Background
from checkpointing.loader import LoadedCheckpoint

# What one rank's snapshots take at most: its own copy (the buffer it keeps for the next), and the
# two newest each of its keepers holds (so one still arriving never leaves a rank without a complete
# one; actors/snapshot_keeper.py's KEEP).
KEPT_PER_KEEPER = 2
LogFn = Callable[[int, dict[str, float]], None]
ReportFn = Callable[[str, str, str, int, dict], None]  # (kind, severity, message, step, data)


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def state_bytes(*objs: Any) -> int:
    """Bytes of every tensor in nested dicts/lists: what a host copy of them takes (of a
    DTensor, this rank's slice)."""
    dtensor = format._dtensor_type()
    total, stack = 0, list(objs)
    while stack:
        o = stack.pop()
        if dtensor is not None and isinstance(o, dtensor):
            local = o.to_local()
            total += local.numel() * local.element_size()
        elif isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def capture(packer: flat.Packer, *, step: int, rank: int, world_size: int, run_id: str, model_state: dict,
            optim_state: dict | None, sampler_state: dict, sharded: bool = False) -> tuple[dict[str, Any], torch.Tensor]:
    """This rank's whole resumable state (the same as a checkpoint holds) as (header, buffer): the
    model's and optimizer's state dicts (a function's ctx.save state as the model's) packed into
    the packer's buffer (of a DTensor, this rank's slice: nothing is gathered), with RNG and
    sampler in the header. `sharded`: the state dicts hold DTensors."""
    skeleton, table, data = packer.pack({"model": model_state, "optim": optim_state})
    header = {"step": step, "rank": rank, "world_size": world_size, "run_id": run_id, "sharded": sharded,
              "state": skeleton, "table": table, "rng": format.rng_state(), "sampler": format.plain(dict(sampler_state))}
    return header, data


@dataclass
class LoadedSnapshot(LoadedCheckpoint):
    """A sharded snapshot: `local` holds this rank's slices ({"model": ..., "optim": ...}, keyed as
    the module's and optimizer's own state_dict() key them), read into a sharded model of the same
    world size by `read_sharded` (model and optimizer are None)."""

    local: dict[str, Any] | None = None

    @property
    def sharded(self) -> bool:
        return self.local is not None


def as_loaded(parts: list, *, where: str) -> LoadedCheckpoint:
    """A snapshot as a keeper holds it ([header, buffer]: flat.to_wire) as what restore_state
    takes (never unpickles arbitrary objects)."""
    snap, data = flat.from_wire(parts)
    snap.update(flat.unpack(snap.pop("state"), snap.pop("table"), data))
    common = dict(step=int(snap["step"]), uri=where, manifest={},
                  meta={"step": snap["step"], "run_id": snap["run_id"], "world_size": snap["world_size"], "config": {}},
                  rank_state={"rng": snap["rng"], "sampler": snap["sampler"]})
    if snap.get("sharded"):
        local = {"model": snap["model"]} if snap["optim"] is None else {"model": snap["model"], "optim": snap["optim"]}
        return LoadedSnapshot(model=None, optimizer=None, local=local, **common)
    return LoadedCheckpoint(model=snap["model"], optimizer=snap["optim"], **common)


# --- a sharded snapshot into a sharded model ------------------------------------------------


def read_sharded(loaded: LoadedCheckpoint, state: dict[str, Any]) -> list[str]:
    """checkpointing.loader.read_sharded, for a sharded snapshot too: fill `state` (a template
    shaped for this rank: for a snapshot, keyed as it was taken, {"model": model.state_dict(),
    "optim": optimizer.state_dict()} or a function's ctx.save state) in place;
    returns the saved keys (dotted paths) the template lacks. A snapshot's slices go straight
    into the template's local tensors: no collective, no file."""
    if not isinstance(loaded, LoadedSnapshot) or loaded.local is None:
        return loader.read_sharded(loaded, state)
    unread: list[str] = []
    for key in state:
        if key not in loaded.local:
            raise KeyError(f"the snapshot of step {loaded.step} has no {key!r}")
        state[key] = _fill(state[key], loaded.local[key], key, unread)
    unread += [k for k in loaded.local if k not in state]
    return sorted(unread)


def sharded_keys(loaded: LoadedCheckpoint) -> set[str]:
    """checkpointing.loader.sharded_keys, for a sharded snapshot too (dotted paths, as DCP's)."""
    if not isinstance(loaded, LoadedSnapshot) or loaded.local is None:
        return loader.sharded_keys(loaded)
    keys: set[str] = set()
    stack = [(k, v) for k, v in loaded.local.items()]
    while stack:
        path, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}", x) for k, x in v.items())
        else:
            keys.add(path)
    return keys


@torch.no_grad()
def _fill(template: Any, saved: Any, path: str, unread: list[str]) -> Any:
    """`template` with `saved` put in: tensors copied in place (a DTensor's local slice, which
    must have the saved slice's shape: the same world size and mesh), plain values replaced.
    Returns what goes at `path` in the parent."""
    if isinstance(template, dict):
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: the snapshot holds a {type(saved).__name__}, the template a dict")
        missing = [k for k in template if k not in saved]
        if missing:
            raise KeyError(f"{path}.{missing[0]}: not in the snapshot")
        for k in template:
            template[k] = _fill(template[k], saved[k], f"{path}.{k}", unread)
        unread += [f"{path}.{k}" for k in saved if k not in template]
        return template
    if isinstance(template, (list, tuple)) and isinstance(saved, (list, tuple)) and len(template) == len(saved):
        pairs = enumerate(zip(template, saved, strict=True))
        return type(template)(_fill(t, v, f"{path}.{i}", unread) for i, (t, v) in pairs)
    if isinstance(template, torch.Tensor):
        dtensor = format._dtensor_type()
        target = template.to_local() if dtensor is not None and isinstance(template, dtensor) else template
        if not isinstance(saved, torch.Tensor) or saved.shape != target.shape or saved.dtype != target.dtype:
            got = f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise ValueError(f"{path}: this rank holds {tuple(target.shape)} {target.dtype}, the snapshot {got} "
                             f"(a snapshot restores only onto the world size and mesh that took it)")
        target.copy_(saved)
        return template
    return saved


class Snapshotter:
    """What the training loop calls: due(), take() and close().

    `keepers`: [(where, client)], each client answering call("reserve", rank, step, nbytes,
    attempt) and call("put", rank, step, world_size, attempt, data) with None (taken) or why not
    (checkpointing.client's clients); `where` names its node in events. `stage(parts)` turns a
    snapshot's parts into what every keeper's put gets (over Ray: one object, not one copy per
    keeper). `report(kind, severity, message, step, data)` records an event; `flush()` delivers
    the rank's buffered metrics."""

    def __init__(self, *, every_steps: int, limit_bytes: int, rank: int, world_size: int, run_id: str, attempt: int,
                 keepers: list[tuple[str, Any]], report: ReportFn, flush: Callable[[], Any] = lambda: None,
                 stage: Callable[[list], Any] = lambda parts: parts,
                 clock: Callable[[], float] = time.perf_counter, warn: Callable[[str], None] | None = None):
        if not keepers:
            raise ValueError("a Snapshotter needs at least one keeper")
        self.every, self.limit = every_steps, limit_bytes
        self.rank, self.world_size, self.run_id, self.attempt = rank, world_size, run_id, attempt
        self.keepers, self.report, self.flush, self.stage, self.clock = keepers, report, flush, stage, clock
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.sender = Background(f"snapshot-sender-{rank}")
        self.packer = flat.Packer()  # its buffer outlives a snapshot: holdings() counts it as the rank's own copy
        self.skipping: str | None = None  # the reasons last reported, so a skip is said once, not every K steps
        self.sent: list[int] = []  # steps every keeper took
        self.blocked: list[float] = []

    def holdings(self) -> int:
        """How many copies of one snapshot the rank's snapshots take at most (its buffer, and each keeper's two)."""
        return 1 + KEPT_PER_KEEPER * len(self.keepers)

    def _over(self, what: str = "its size") -> str:
        holders = "its keeper" if len(self.keepers) == 1 else f"each of its {len(self.keepers)} keepers"
        return f"{self.holdings()} x {what} (its own copy and the two newest {holders} holds)"

    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done % self.every == 0

    def take(self, step: int, *, model, optimizer, sampler_state: dict, log: LogFn | None = None) -> None:
        """Snapshot after `step` optimizer steps: blocks for the previous send (if still running)
        and the copy to host memory; returns while it is encoded and sent."""
        t0 = self.clock()
        self.wait()
        # the objects' own state dicts, not torch's get_state_dict: a snapshot goes back only into the same
        # model, optimizer and mesh, where their keys hold, and renaming them to FQNs costs more than the copy
        model_state = model.state_dict()  # FSDP2: this rank's DTensors (nothing gathered)
        optim_state = optimizer.state_dict() if optimizer is not None else None
        sharded = format.holds_dtensors(model_state) or format.holds_dtensors(optim_state)
        need = self.holdings() * state_bytes(model_state, optim_state)
        if need > self.limit:
            return self._skip(step, "limit", need, f"{self._over()} is {mb(need)}, over "
                              f"checkpoint.memory_limit_mb={self.limit / 2**20:g}")
        header, data = capture(self.packer, step=step, rank=self.rank, world_size=self.world_size, run_id=self.run_id,
                               model_state=model_state, optim_state=optim_state, sampler_state=sampler_state,
                               sharded=sharded)
        blocked = self.clock() - t0
        self.blocked.append(blocked)
        if log is not None:
            log(step - 1, {"ckpt/snapshot_blocked_s": blocked})
        # the buffer is the packer's, reused by the next take(), which first waits for this send
        self.sender.submit(self._send, step, header, data, log)

    def wait(self) -> None:
        self.sender.wait()

    def close(self) -> None:
        self.sender.close()

    # --- background thread -----------------------------------------------------------------

    def _send(self, step: int, header: dict, data: torch.Tensor, log: LogFn | None) -> None:
        t0 = self.clock()
        try:
            parts = flat.to_wire(header, data)
            size = len(parts[0]) + data.nbytes  # the header's bytes and the buffer
            if self.holdings() * size > self.limit:
                return self._skip(step, "limit", self.holdings() * size,
                                  f"{self._over('its encoded size')} is "
                                  f"{mb(self.holdings() * size)}, over checkpoint.memory_limit_mb={self.limit / 2**20:g}")
            self.flush()  # what a restore from this snapshot will not replay is stored first
            staged = self.stage(parts)
        except Exception as e:
            return self._skip(step, "error", 0, first_line(e))
        refusals = {}
        for where, keeper in self.keepers:
            try:
                refused = keeper.call("reserve", self.rank, step, size, self.attempt)
                if refused is None:
                    refused = keeper.call("put", self.rank, step, self.world_size, self.attempt, staged)
                if refused is not None:
                    refusals[where] = ("keeper", refused)
            except Exception as e:  # that keeper's node is gone, a timeout: the next snapshot tries again
                refusals[where] = ("error", first_line(e))
        if refusals:
            return self._refused(step, size, refusals)
        self.sent.append(step)
        if self.skipping is not None:
            self.skipping = None
            self.warn(f"rank {self.rank}: in-memory snapshots are taken again (step {step})")
        if log is not None:
            log(step - 1, {"ckpt/snapshot_send_s": self.clock() - t0, "ckpt/snapshot_bytes": float(size)})

    def _refused(self, step: int, size: int, refusals: dict[str, tuple[str, str]]) -> None:
        """Some keeper did not take the snapshot: said once per set of refusing keepers and reasons."""
        kept = [w for w, _ in self.keepers if w not in refusals]
        why = "; ".join(f"{'keeper on ' + w + ': ' if w else ''}{msg}" for w, (_, msg) in refusals.items())
        reasons = sorted({reason for reason, _ in refusals.values()})
        key = "/".join(reasons) + ":" + ",".join(sorted(refusals))
        if not kept:
            return self._skip(step, reasons[0] if len(reasons) == 1 else "/".join(reasons), size, why, key=key)
        if self.skipping == key:
            return
        self.skipping = key
        msg = (f"rank {self.rank}: in-memory snapshot of step {step} kept on {', '.join(kept)} only ({why}); "
               f"it survives a killed rank, but maybe not the loss of that node")
        self.report("snapshot_skipped", "warning", msg, step,
                    {"reason": "/".join(reasons), "bytes": size, "limit_bytes": self.limit, "why": why,
                     "kept_on": kept, "refused_by": sorted(refusals)})

    def _skip(self, step: int, reason: str, nbytes: int, why: str, key: str | None = None) -> None:
        if self.skipping == (key or reason):
            return
        self.skipping = key or reason
        msg = f"rank {self.rank}: in-memory snapshot of step {step} skipped ({why}); durable checkpoints only"
        wheres = [w for w, _ in self.keepers if w]
        if wheres and key is None:
            msg += f" (keeper{'s' if len(wheres) > 1 else ''} on {', '.join(wheres)})"
        self.report("snapshot_skipped", "warning", msg, step,
                    {"reason": reason, "bytes": nbytes, "limit_bytes": self.limit, "why": why})


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
