"""How the answer to a read (POST /ingest/v1/read) travels: JSON, with what JSON cannot say tagged.

A read answers with what the Store method returned, and the client must get back exactly that
(the CLI prints the same over HTTP as from the database), so:

- NaN and infinities (a diverged loss) become {"$f": "nan" | "inf" | "-inf"} (the server's JSON
  is strict and would make them null);
- numpy arrays become {"$a": dtype, "b": base64 of the bytes}; a series' Points, {"$p": [steps, values]};
- a long list of flat, same-keyed rows of numbers (a metric series: step, value, min, max) goes as
  columns, {"$rows": keys, "c": [column arrays]}: 10M points are ~160 MB of base64
  instead of ~600 MB of JSON objects, and decode in numpy;
- a dict with a key starting with "$" (a user's config may hold one) goes as {"$d": [[k, v], ...]}.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from orchestrator.series import Points

COLUMNS_FROM = 64  # shorter lists of rows go as they are


def encode(x: Any) -> Any:
    if isinstance(x, bool) or x is None or isinstance(x, int | str):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"$f": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
    if isinstance(x, np.generic):
        return encode(x.item())
    if isinstance(x, np.ndarray):
        return _array(x)
    if isinstance(x, Points):
        return {"$p": [_array(x.steps), _array(x.values)]}
    if isinstance(x, dict):
        if any(isinstance(k, str) and k.startswith("$") for k in x):
            return {"$d": [[k, encode(v)] for k, v in x.items()]}
        return {str(k): encode(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        cols = _columns(x) if len(x) >= COLUMNS_FROM else None
        return cols if cols is not None else [encode(v) for v in x]
    return str(x)  # a Path, a datetime: as the server's JSON would show it


def decode(x: Any) -> Any:
    if isinstance(x, list):
        return [decode(v) for v in x]
    if not isinstance(x, dict):
        return x
    if "$f" in x:
        return float(x["$f"])
    if "$a" in x:
        return np.frombuffer(base64.b64decode(x["b"]), dtype=np.dtype(x["$a"])).copy()
    if "$p" in x:
        steps, values = (decode(a) for a in x["$p"])
        return Points(steps, values)
    if "$d" in x:
        return {k: decode(v) for k, v in x["$d"]}
    if "$rows" in x:
        cols = [decode(c).tolist() for c in x["c"]]  # tolist: Python ints and floats, as the store gave
        return [dict(zip(x["$rows"], vals, strict=True)) for vals in zip(*cols, strict=True)]
    return {k: decode(v) for k, v in x.items()}


def _array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    return {"$a": a.dtype.str, "b": base64.b64encode(a.tobytes()).decode("ascii")}


def _columns(rows) -> dict | None:
    """Rows that are dicts with the same str keys and int or float values -> columns, else None."""
    first = rows[0]
    if not isinstance(first, dict) or not first:
        return None
    keys = list(first)
    kinds = []
    for k in keys:
        v = first[k]
        if not isinstance(k, str) or k.startswith("$") or isinstance(v, bool) or not isinstance(v, int | float):
            return None
        kinds.append("i" if isinstance(v, int) else "f")
    cols: list[list] = [[] for _ in keys]
    for row in rows:
        if not isinstance(row, dict) or len(row) != len(keys):
            return None
        for i, k in enumerate(keys):
            v = row.get(k)
            if type(v) is not (int if kinds[i] == "i" else float):
                return None
            cols[i].append(v)
    try:
        arrays = [np.array(c, dtype=np.int64 if kind == "i" else np.float64) for c, kind in zip(cols, kinds, strict=True)]
    except OverflowError:  # an int past int64: as it is
        return None
    return {"$rows": keys, "c": [_array(a) for a in arrays]}
