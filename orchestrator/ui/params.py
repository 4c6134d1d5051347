"""Query parameters of the JSON API, checked before anything reads the store.

A bad value is a BadRequest (an HTTP 400) saying what was wrong and what was expected, never an
exception further down: float("1e400") is inf and int(inf) raises OverflowError, and a step
beyond int64 overflows SQLite and numpy.
"""

from __future__ import annotations

import math

STEP_LIMIT = 2**62  # steps are int64 in the store; ranges.BIG is the same bound
MAX_BUCKETS = 4000  # the front end asks for one per pixel of a chart
MAX_RANK = 2**31 - 1
MAX_COMPARE = 20
MAX_QUERY_FIELDS = 64


class BadRequest(Exception):
    """The request is wrong; the message says how, and what would be right."""


def integer(query: dict, name: str, *, lo: int, hi: int, default: int | None = None) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    expected = f"{name} must be an integer from {_num(lo)} to {_num(hi)}, got {raw[:40]!r}"
    if len(raw) > 40:
        raise BadRequest(expected)
    try:
        value = int(raw)
    except ValueError:  # "1e3" and "200.0" are integers too (JavaScript writes big numbers so)
        try:
            f = float(raw)
        except ValueError:
            raise BadRequest(expected) from None
        if not math.isfinite(f) or f != math.floor(f):
            raise BadRequest(expected) from None
        value = int(f)
    if not lo <= value <= hi:
        raise BadRequest(expected)
    return value


def _num(n: int) -> str:
    if abs(n) == STEP_LIMIT:
        return "-2**62" if n < 0 else "2**62"
    return str(n)


def metric_args(query: dict) -> dict:
    if not query.get("key"):
        raise BadRequest("metric: the key parameter is missing (e.g. key=train/loss)")
    args = {
        "key": query["key"],
        "buckets": integer(query, "buckets", lo=1, hi=MAX_BUCKETS, default=1000),
        "rank": integer(query, "rank", lo=0, hi=MAX_RANK),
        "lo": integer(query, "lo", lo=-STEP_LIMIT, hi=STEP_LIMIT),
        "hi": integer(query, "hi", lo=-STEP_LIMIT, hi=STEP_LIMIT),
    }
    if args["lo"] is not None and args["hi"] is not None and args["hi"] < args["lo"]:
        raise BadRequest(f"empty step range: lo={args['lo']} is above hi={args['hi']} (expected lo <= hi)")
    return args


def run_refs(query: dict) -> list[str]:
    """The runs of a compare, each once, in the order given."""
    refs = list(dict.fromkeys(r for r in query.get("runs", "").split(",") if r))
    if len(refs) > MAX_COMPARE:
        raise BadRequest(f"compare takes at most {MAX_COMPARE} runs, got {len(refs)} different ones")
    if len(refs) < 2:
        raise BadRequest(f"compare needs at least two different runs (runs=A,B), got {len(refs)}")
    return refs
