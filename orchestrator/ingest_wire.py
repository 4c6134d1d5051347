"""The ingest API's wire format, shared by RemoteStore (client) and the server's ingest module.

A batch is one POST body:

    b"OBATCH1\\n" | header length (uint32, little endian) | header (JSON, UTF-8) | payload

The header is {"client": str, "seq": int, "units": [[op, ...], ...]}. A unit is what one Store call,
or one `with store.transaction():` block, wrote; the server applies each unit whole. An op is
{"op": NAME, ...}; a "points" op ({"op": "points", "run_id", "rank", "attempt", "seq", "keys":
[[key, n], ...]}) takes, for each of its keys in order, n int64 steps then n float64 values from
the payload, which holds the points ops' arrays one after another. Binary columns keep a batch of
a million points at 16 MB and make decoding a view, not a parse.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

MAGIC = b"OBATCH1\n"
CONTENT_TYPE = "application/vnd.orchestrator.batch"
MAX_HEADER = 64 * 2**20
MAX_KEY = 1024  # characters of a metric key


class BadBatch(ValueError):
    """A body that is not a well-formed batch; the message says what was wrong."""


def _plain(x):
    """numpy scalars and arrays (from the anomaly detector, say) as JSON values."""
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot send a {type(x).__name__} to the tracking server")


def dumps(obj) -> str:
    """JSON of plain data; NaN and infinities pass (both ends are ours), numpy scalars too."""
    return json.dumps(obj, default=_plain)


def encode(client: str, seq: int, units: list[list[dict]], arrays: list[np.ndarray]) -> bytes:
    """`arrays`: the points ops' steps and values, in the order decode() takes them."""
    header = dumps({"client": client, "seq": seq, "units": units}).encode()
    parts = [MAGIC, struct.pack("<I", len(header)), header]
    parts += [np.ascontiguousarray(a).tobytes() for a in arrays]
    return b"".join(parts)


def points_op(run_id: str, rank: int, attempt: int, seq: int | None,
              data: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict, list[np.ndarray], int]:
    """A points op for SeriesStore.append's arguments, its arrays and its point count."""
    keys, arrays, total = [], [], 0
    for key, (steps, vals) in data.items():
        s = np.asarray(steps, dtype="<i8").ravel()
        v = np.asarray(vals, dtype="<f8").ravel()
        if len(s) != len(v):
            raise ValueError(f"metric {key!r}: {len(s)} steps but {len(v)} values")
        if len(s) == 0:
            continue
        keys.append([key, len(s)])
        arrays += [s, v]
        total += len(s)
    op = {"op": "points", "run_id": run_id, "rank": int(rank), "attempt": int(attempt),
          "seq": None if seq is None else int(seq), "keys": keys}
    return op, arrays, total


def decode(body: bytes) -> tuple[str, int, list[list[dict]]]:
    """(client, seq, units); each points op gets "data": {key: (steps, values)} (views of `body`)."""
    if not body.startswith(MAGIC):
        raise BadBatch(f"not an ingest batch: expected a body starting with {MAGIC!r} (Content-Type {CONTENT_TYPE})")
    if len(body) < len(MAGIC) + 4:
        raise BadBatch("batch cut short: no header length")
    (n,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_HEADER or start + n > len(body):
        raise BadBatch(f"batch header of {n} bytes does not fit in a body of {len(body)} bytes")
    try:
        header = json.loads(body[start:start + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise BadBatch(f"batch header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadBatch("batch header must be a JSON object with client, seq and units")
    client, seq, units = header.get("client"), header.get("seq"), header.get("units")
    if not isinstance(client, str) or not 8 <= len(client) <= 128:
        raise BadBatch("batch header: client must be a string of 8 to 128 characters")
    if not _is_int(seq) or seq < 1:
        raise BadBatch("batch header: seq must be an integer >= 1")
    if not isinstance(units, list) or not all(isinstance(u, list) and all(isinstance(o, dict) for o in u)
                                              for u in units):
        raise BadBatch("batch header: units must be a list of lists of op objects")
    payload = memoryview(body)[start + n:]
    at = 0
    for unit in units:
        for op in unit:
            if op.get("op") != "points":
                continue
            keys = op.get("keys")
            if not isinstance(keys, list):
                raise BadBatch("points op: keys must be a list of [key, count]")
            data = {}
            for item in keys:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and _is_int(item[1])
                        and 0 < item[1] and 0 < len(item[0]) <= MAX_KEY):
                    raise BadBatch(f"points op: bad key entry {str(item)[:100]} (expected [key, count > 0])")
                key, count = item
                size = 8 * count
                if at + 2 * size > len(payload):
                    raise BadBatch(f"points op: metric {key[:100]!r} needs {2 * size} bytes past offset {at}; "
                                   f"the payload has {len(payload)}")
                steps = np.frombuffer(payload, dtype="<i8", count=count, offset=at)
                vals = np.frombuffer(payload, dtype="<f8", count=count, offset=at + size)
                data[key] = (steps, vals)
                at += 2 * size
            op["data"] = data
    if at != len(payload):
        raise BadBatch(f"batch payload has {len(payload) - at} bytes no points op accounts for")
    return client, seq, units


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
