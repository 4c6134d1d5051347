"""A snapshot's wire form: every tensor's bytes in one flat buffer, and a small header (the
state's structure with each tensor replaced by a marker, and each tensor's place in the buffer).

Why not torch.save, as a checkpoint file is written: it makes a second full copy of the state and
holds the GIL while it does, every few steps, in the training process, where the next step's
Python code then waits for the GIL. Here the training thread copies each tensor straight into a
buffer that is kept from one snapshot to the next (fresh memory would cost a page fault per 4 KB
on every snapshot), and sending it is one copy into the object store, which Ray makes without
the GIL. The header alone goes through torch.save, and is read back with weights_only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from checkpointing import format

MARK = "\x00flat"  # a tensor's marker is {MARK: its index in the table}: no state dict key holds a NUL
ALIGN = 64  # every tensor starts at a multiple of this, so a slice views as any dtype


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Packer:
    """Packs states into one buffer that it keeps and reuses (grown when a state outgrows it).
    A packed buffer is valid until the next pack()."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    @torch.no_grad()
    def pack(self, obj: Any) -> tuple[Any, list, torch.Tensor]:
        """(skeleton, table, flat): `obj` with each dense tensor (of a DTensor, this rank's
        slice) replaced by a marker; per marker (offset, dtype name, shape); the bytes."""
        tensors: list[torch.Tensor] = []
        skeleton = _strip(obj, tensors, format._dtensor_type())
        # one region per dtype, so that on CPU one torch.cat fills each (per-tensor copies cost
        # more in Python than in memcpy: an optimizer state has three tensors per parameter)
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(t.dtype, []).append(i)
        table: list = [None] * len(tensors)
        regions, end = [], 0
        for dtype, members in groups.items():
            start = end = _aligned(end)
            for i in members:
                table[i] = (end, str(dtype).removeprefix("torch."), list(tensors[i].shape))
                end += tensors[i].nbytes
            regions.append((start, end, dtype, members))
        on_gpu = any(t.is_cuda for t in tensors)
        flat = self._buffer(end, pinned=on_gpu)
        for start, stop, dtype, members in regions:
            region = flat[start:stop].view(dtype)
            if on_gpu:  # each copy queued from the device into pinned memory
                for i in members:
                    view(flat, table[i][0], dtype, table[i][2]).copy_(tensors[i], non_blocking=True)
            elif members:
                torch.cat([tensors[i].reshape(-1) for i in members], out=region)
        if on_gpu:
            torch.cuda.synchronize()  # the queued copies are complete before the buffer is read
        return skeleton, table, flat[:end]

    def _buffer(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        b = self.buffer
        if b is None or b.numel() < nbytes or (pinned and not b.is_pinned()):
            b = self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned and torch.cuda.is_available())
        return b


def view(flat: torch.Tensor, start: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    n = math.prod(shape) * dtype.itemsize
    return flat[start:start + n].view(dtype).view(shape)


def unpack(skeleton: Any, table: list, flat: torch.Tensor) -> Any:
    """The packed object back, its tensors views into `flat` (which must be writable and outlive them)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"a snapshot's buffer must be a 1-D uint8 tensor, got {flat.dtype} {tuple(flat.shape)}")
    tensors = []
    for i, entry in enumerate(table):
        start, name, shape = entry
        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"a snapshot's tensor {i} has an unknown dtype {name!r}")
        end = start + math.prod(shape) * dtype.itemsize
        if start < 0 or end > flat.numel():
            raise ValueError(f"a snapshot's tensor {i} ends at byte {end}, past its buffer's {flat.numel()}")
        tensors.append(view(flat, start, dtype, shape))
    return _fill(skeleton, tensors)


def to_wire(header: dict, flat: torch.Tensor) -> list:
    """[header bytes, the buffer as a numpy array]: what a keeper keeps. A numpy array goes into
    Ray's object store out of band (one copy, without the GIL); bytes would be pickled in band."""
    return [format.encode(header), flat.numpy()]


def from_wire(parts: list) -> tuple[dict, torch.Tensor]:
    """The header and a writable copy of the buffer (what arrived may be read-only shared memory)."""
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        raise ValueError(f"a snapshot is [header, buffer], got {type(parts).__name__}")
    header = format.decode(bytes(parts[0]))
    return header, torch.from_numpy(np.frombuffer(parts[1], dtype=np.uint8).copy())


def _strip(obj: Any, tensors: list[torch.Tensor], dtensor: type | None = None) -> Any:
    if isinstance(obj, torch.Tensor):
        if dtensor is not None and isinstance(obj, dtensor):
            obj = obj.to_local()
        if obj.layout != torch.strided or obj.is_meta or obj.is_quantized:
            return format.to_host(obj)  # rare: travels in the header, through torch.save
        tensors.append(obj)
        return {MARK: len(tensors) - 1}
    if isinstance(obj, dict):
        return {k: _strip(v, tensors, dtensor) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors, dtensor) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if len(obj) == 1 and MARK in obj:
            return tensors[obj[MARK]]
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj
