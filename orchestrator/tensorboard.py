"""Scalars from TensorBoard event files, read without TensorFlow or TensorBoard.

An event file is a TFRecord stream: each record is

    uint64 length (little-endian) | uint32 masked CRC32C of those 8 bytes | data | uint32 masked CRC32C of data

and each record's data is a serialized `Event` protobuf (wall_time = 1: double, step = 2: int64,
summary = 5: Summary). A `Summary` holds values (1), each with tag (1), metadata (9: plugin_data
(1: plugin_name (1))), and either simple_value (2: float, the legacy scalar) or tensor (8:
TensorProto with dtype (1), tensor_shape (2), tensor_content (4) or typed value lists). A tensor
is a scalar when its tag's plugin is "scalars" (TensorFlow 2, tensorboardX's new_style) and it
holds one number. Images, histograms, audio and text are skipped (counted).

A record whose data CRC fails is skipped and reading goes on; a bad length CRC or a short read
means the framing is lost, so the rest of that file is skipped. Each problem names the file
and the byte offset.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_CRC_TABLE: list[int] = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1  # Castagnoli polynomial, reflected
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's CRC: rotated right by 15 bits plus a constant (so a CRC of CRCs is not trivial)."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- TFRecord framing -----------------------------------------------------------------------

BATCH = 4096  # records whose data CRCs are checked together


def records(path: Path, problems: list[str]) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of each intact record; what is wrong goes to `problems`, one line each,
    in file order."""
    size = path.stat().st_size
    batch: list[tuple[int, bytes, int]] = []
    lost = None  # where the framing was lost, and why
    with open(path, "rb") as f:
        offset = 0
        while True:
            head = f.read(12)
            if len(head) < 12:
                if head:
                    lost = f"truncated record header at byte offset {offset}; the rest is missing"
                break
            length, length_crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != length_crc:
                lost = f"corrupt record length at byte offset {offset} (CRC mismatch); the rest of the file skipped"
                break
            if offset + 16 + length > size:
                lost = (f"truncated record at byte offset {offset} ({length} bytes announced, "
                        f"{max(0, size - offset - 16)} present); the rest is missing")
                break
            body = f.read(length + 4)
            batch.append((offset, body[:length], struct.unpack("<I", body[length:])[0]))
            offset += 16 + length
            if len(batch) >= BATCH:
                yield from _checked(path, batch, problems)
                batch = []
    yield from _checked(path, batch, problems)
    if lost:
        problems.append(f"{path}: {lost}")


def _checked(path: Path, batch: list[tuple[int, bytes, int]], problems: list[str]) -> Iterator[tuple[int, bytes]]:
    crcs = masked_crc_many([data for _, data, _ in batch])
    for (offset, data, want), got in zip(batch, crcs.tolist(), strict=True):
        if got == want:
            yield offset, data
        else:
            problems.append(f"{path}: corrupt record at byte offset {offset} (data CRC mismatch); skipped")


_CRC_NP = np.array(_CRC_TABLE, dtype=np.uint32)


def masked_crc_many(datas: list[bytes]) -> np.ndarray:
    """masked_crc of many byte strings at once: strings of one length go through the table
    together, one byte position per numpy step (scalar events are a few lengths, repeated)."""
    out = np.zeros(len(datas), dtype=np.uint32)
    by_len: dict[int, list[int]] = {}
    for i, d in enumerate(datas):
        by_len.setdefault(len(d), []).append(i)
    for length, idx in by_len.items():
        if len(idx) < 8:  # not worth the numpy overhead
            for i in idx:
                out[i] = masked_crc(datas[i])
            continue
        rows = np.frombuffer(b"".join(datas[i] for i in idx), dtype=np.uint8).reshape(len(idx), length)
        cols = np.ascontiguousarray(rows.T)
        c = np.full(len(idx), 0xFFFFFFFF, dtype=np.uint32)
        for j in range(length):
            c = _CRC_NP[(c ^ cols[j]) & 0xFF] ^ (c >> 8)
        c ^= np.uint32(0xFFFFFFFF)
        out[idx] = ((c >> 15) | (c << 17)) + np.uint32(0xA282EAD8)  # uint32 arithmetic wraps
    return out


# --- protobuf wire format (only what Event/Summary need) -------------------------------------

class DecodeError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("a varint runs past the end of the message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise DecodeError("a varint longer than 10 bytes")


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value): an int for varints and fixed-width fields (their raw
    bits), bytes for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise DecodeError("a 64-bit field runs past the end")
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise DecodeError("a length-delimited field runs past the end")
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise DecodeError("a 32-bit field runs past the end")
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise DecodeError(f"unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _f64(bits: int) -> float:
    return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def _f32(bits: int) -> float:
    return struct.unpack("<f", bits.to_bytes(4, "little"))[0]


# TensorFlow DataType numbers -> (numpy dtype of tensor_content, TensorProto field of typed values)
DTYPES = {1: ("<f4", 5), 2: ("<f8", 6), 3: ("<i4", 7), 4: ("u1", 7), 5: ("<i2", 7), 6: ("i1", 7),
          9: ("<i8", 10), 10: ("?", 11), 14: ("bfloat16", 13), 17: ("<u2", 7), 19: ("<f2", 13)}


def _tensor_scalar(buf: bytes) -> float | None:
    """The one number a TensorProto holds, or None when it holds another count or type."""
    dtype, content, typed, dims = 0, None, [], []
    for number, wire, value in fields(buf):
        if number == 1 and wire == 0:
            dtype = value
        elif number == 2 and wire == 2:
            dims = [d for n, w, d in fields(value) if n == 2 and w == 2]
        elif number == 4 and wire == 2:
            content = value
        elif number in (5, 6, 7, 10, 11, 13):
            typed.append((number, wire, value))
    if dtype not in DTYPES or any(_dim_size(d) != 1 for d in dims):
        return None
    np_type, typed_field = DTYPES[dtype]
    if content:
        if np_type == "bfloat16":
            if len(content) != 2:
                return None
            return _f32(int.from_bytes(content, "little") << 16)
        arr = np.frombuffer(content, dtype=np_type)
        return float(arr[0]) if len(arr) == 1 else None
    values = []
    for number, wire, value in typed:
        if number != typed_field:
            continue
        if wire == 2:  # packed
            values += _unpack(number, value)
        else:
            values.append(_one(number, value))
    if len(values) != 1:
        return None
    v = values[0]
    if dtype == 19:  # half_val carries the float16 bits
        return float(np.array([v], dtype="<u2").view("<f2")[0])
    if dtype == 14:
        return _f32((v & 0xFFFF) << 16)
    return float(v)


def _dim_size(dim: bytes) -> int:
    for n, w, v in fields(dim):
        if n == 1 and w == 0:
            return _signed64(v)
    return 0


def _one(number: int, raw: int) -> float:
    if number == 5:
        return _f32(raw)
    if number == 6:
        return _f64(raw)
    if number in (7, 10):  # int32 and int64 varints: negatives are sign-extended to 64 bits
        return _signed64(raw)
    return raw


def _unpack(number: int, buf: bytes) -> list[float]:
    if number == 5:
        return np.frombuffer(buf, "<f4").tolist() if len(buf) % 4 == 0 else []
    if number == 6:
        return np.frombuffer(buf, "<f8").tolist() if len(buf) % 8 == 0 else []
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(_one(number, v))
    return out


@dataclass
class Scalars:
    """What one directory's event files held."""

    rows: list[tuple[str, int, float, float]] = field(default_factory=list)  # (tag, step, value, wall time)
    skipped: int = 0  # non-scalar values (images, histograms, text, ...)
    events: int = 0


def read_event(data: bytes, out: Scalars, plugins: dict[str, str]) -> None:
    """Add one Event's scalars to `out`. `plugins` remembers each tag's plugin: writers put the
    metadata on a tag's first value only."""
    wall, step, summary = float("nan"), 0, None
    for number, wire, value in fields(data):
        if number == 1 and wire == 1:
            wall = _f64(value)
        elif number == 2 and wire == 0:
            step = _signed64(value)
        elif number == 5 and wire == 2:
            summary = value
    out.events += 1
    if summary is None:
        return
    for number, wire, value in fields(summary):
        if number != 1 or wire != 2:
            continue
        tag, simple, tensor, other = "", None, None, False
        for n, w, v in fields(value):
            if n == 1 and w == 2:
                tag = v.decode("utf-8", "replace")
            elif n == 2 and w == 5:
                simple = _f32(v)
            elif n == 8 and w == 2:
                tensor = v
            elif n == 9 and w == 2:
                plugin = _plugin_name(v)
                if plugin:
                    plugins[tag] = plugin
            elif n in (3, 4, 5, 6):
                other = True
        if simple is not None:
            out.rows.append((tag, step, simple, wall))
        elif tensor is not None and plugins.get(tag) == "scalars":
            number_ = _tensor_scalar(tensor)
            if number_ is None:
                out.skipped += 1
            else:
                out.rows.append((tag, step, number_, wall))
        elif tensor is not None or other:
            out.skipped += 1


def _plugin_name(metadata: bytes) -> str | None:
    for n, w, v in fields(metadata):
        if n == 1 and w == 2:
            for n2, w2, v2 in fields(v):
                if n2 == 1 and w2 == 2:
                    return v2.decode("utf-8", "replace")
        if n == 4 and w == 0 and v == 1:  # data_class: DATA_CLASS_SCALAR
            return "scalars"
    return None


def read_directory(files: list[Path], problems: list[str]) -> Scalars:
    """The scalars of one run's event files, in file order (names sort by creation time)."""
    out = Scalars()
    plugins: dict[str, str] = {}
    for path in files:
        try:
            for offset, data in records(path, problems):
                try:
                    read_event(data, out, plugins)
                except DecodeError as e:
                    problems.append(f"{path}: undecodable event at byte offset {offset} ({e}); skipped")
        except OSError as e:
            problems.append(f"{path}: cannot read ({e.strerror or e})")
    return out
