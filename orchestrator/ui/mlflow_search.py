"""MLflow's search syntax, the part its clients use: `filter` strings and `order_by` clauses of
runs/search and experiments/search, over runs already turned into MLflow's JSON shape.

    metrics.loss < 0.5 and params.lr = '0.01' and tags.team LIKE 'vision%' and attributes.status = 'FINISHED'

Conditions joined by AND; =, !=, <, <=, >, >= on numbers (metrics, start_time, end_time), =, !=,
LIKE, ILIKE on strings (params, tags, run_name, status, run_id, user_id). IN, OR, IS NULL and
dataset filters are MLflow syntax this server does not answer (NotSupported: a 501).
"""

from __future__ import annotations

import math
import re

ENTITIES = {"metric": "metrics", "metrics": "metrics", "param": "params", "params": "params",
            "parameter": "params", "parameters": "params", "tag": "tags", "tags": "tags",
            "attribute": "attributes", "attributes": "attributes", "attr": "attributes", "run": "attributes"}
NUMERIC_ATTRIBUTES = {"start_time", "end_time", "created", "Created"}
STRING_ATTRIBUTES = {"status", "run_name", "run_id", "user_id", "artifact_uri", "lifecycle_stage", "experiment_id"}
EXPERIMENT_FIELDS = {"name", "experiment_id", "creation_time", "last_update_time"}
NUMBER_OPS = {"=", "!=", "<", "<=", ">", ">="}
STRING_OPS = {"=", "!=", "LIKE", "ILIKE"}

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<tick>`[^`]*`)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![\w.])
  | (?P<word>[A-Za-z_][\w./:-]*)
  | (?P<other>\S)
)""", re.X)


class BadFilter(ValueError):
    """Not valid search syntax (a 400)."""


class NotSupported(ValueError):
    """Valid MLflow syntax that this server does not answer (a 501)."""


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise BadFilter(f"cannot read the filter at character {pos}: {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _unquote(tok: str) -> str:
    body = tok[1:-1]
    return re.sub(r"\\(.)", r"\1", body) if tok[0] in "'\"" else body


def _identifier(toks: list, i: int, *, experiments: bool) -> tuple[tuple[str, str], int]:
    kind, text = toks[i]
    if kind != "word":
        raise BadFilter(f"expected a name such as metrics.loss or params.lr, got {text!r}")
    if experiments:
        field = text.split(".", 1)[1] if text.startswith("attributes.") else text
        if text.startswith("tags.") or text.startswith("tag."):
            return ("tags", text.split(".", 1)[1]), i + 1
        if field not in EXPERIMENT_FIELDS:
            raise NotSupported(f"experiment filter on {text!r} (supported: {', '.join(sorted(EXPERIMENT_FIELDS))}, tags.KEY)")
        return ("attributes", field), i + 1
    head, dot, key = text.partition(".")
    if not dot:  # a bare attribute, as MLflow allows for some: status, run_name
        if text in STRING_ATTRIBUTES | NUMERIC_ATTRIBUTES:
            return ("attributes", text), i + 1
        raise BadFilter(f"{text!r}: expected ENTITY.KEY with ENTITY one of metrics, params, tags, attributes")
    entity = ENTITIES.get(head.lower())
    if entity is None:
        if head.lower() in ("dataset", "datasets"):
            raise NotSupported(f"dataset filters ({text!r})")
        raise BadFilter(f"{text!r}: unknown entity {head!r} (expected metrics, params, tags or attributes)")
    if not key and i + 1 < len(toks) and toks[i + 1][0] in ("str", "tick"):  # metrics.`my key`
        return (entity, _unquote(toks[i + 1][1])), i + 2
    if not key:
        raise BadFilter(f"{text!r}: a key is missing after the dot")
    if entity == "attributes" and key not in STRING_ATTRIBUTES | NUMERIC_ATTRIBUTES:
        raise NotSupported(f"attribute {key!r} in a filter (supported: "
                           f"{', '.join(sorted(STRING_ATTRIBUTES | NUMERIC_ATTRIBUTES))})")
    return (entity, key), i + 1


def parse_filter(text: str | None, *, experiments: bool = False) -> list[tuple[str, str, str, object]]:
    """[(entity, key, op, value)]: every condition must hold."""
    if not text or not text.strip():
        return []
    toks = _tokens(text)
    conds, i = [], 0
    while True:
        (entity, key), i = _identifier(toks, i, experiments=experiments)
        if i >= len(toks):
            raise BadFilter(f"{key!r}: a comparison is missing (e.g. = 'value')")
        kind, op = toks[i]
        if kind == "word" and op.upper() in ("LIKE", "ILIKE"):
            op = op.upper()
        elif kind == "word" and op.upper() in ("IN", "NOT", "IS"):
            raise NotSupported(f"the {op.upper()} operator")
        elif kind != "op":
            raise BadFilter(f"expected a comparison operator after {key!r}, got {op!r}")
        op = "!=" if op == "<>" else op
        i += 1
        if i >= len(toks):
            raise BadFilter(f"a value is missing after {key!r} {op}")
        vkind, vtext = toks[i]
        numeric = entity == "metrics" or (entity == "attributes" and key in NUMERIC_ATTRIBUTES | {"creation_time",
                                                                                              "last_update_time"})
        if numeric:
            if vkind != "num":
                raise BadFilter(f"{entity}.{key} compares with a number, got {vtext!r}")
            if op not in NUMBER_OPS:
                raise BadFilter(f"{op} does not apply to numbers ({entity}.{key})")
            value: object = float(vtext)
        else:
            if vkind not in ("str", "tick"):
                raise BadFilter(f"{entity}.{key} compares with a quoted string, got {vtext!r}")
            if op not in STRING_OPS:
                raise BadFilter(f"{op} does not apply to {entity}.{key} (use =, !=, LIKE or ILIKE)")
            value = _unquote(vtext)
        conds.append((entity, key, op, value))
        i += 1
        if i == len(toks):
            return conds
        kind, word = toks[i]
        if kind == "word" and word.upper() == "OR":
            raise NotSupported("OR in a filter")
        if kind != "word" or word.upper() != "AND":
            raise BadFilter(f"expected AND between conditions, got {word!r}")
        i += 1
        if i == len(toks):
            raise BadFilter("a condition is missing after AND")


def _like(pattern: str, value: str, *, fold: bool) -> bool:
    rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, flags=re.S | (re.I if fold else 0)) is not None


def _compare(have, op: str, want) -> bool:
    if have is None:
        return False
    if op in ("LIKE", "ILIKE"):
        return _like(want, str(have), fold=op == "ILIKE")
    if isinstance(want, float):
        try:
            have = float(have)
        except (TypeError, ValueError):
            return False
        if math.isnan(have):
            return False
    return {"=": have == want, "!=": have != want, "<": have < want, "<=": have <= want,
            ">": have > want, ">=": have >= want}[op]


def value_of(obj: dict, entity: str, key: str):
    """The value a condition or an ordering looks at, in a run's or an experiment's JSON."""
    if entity == "attributes":
        info = obj.get("info", obj)
        if key in ("created", "Created"):
            key = "start_time"
        return info.get(key)
    items = obj["data"][entity] if "data" in obj else obj.get(entity, [])
    for item in items:
        if item["key"] == key:
            v = item["value"]
            return float(v) if entity == "metrics" and isinstance(v, str) else v  # "NaN", "Infinity"
    return None


def matches(obj: dict, conds: list) -> bool:
    return all(_compare(value_of(obj, entity, key), op, want) for entity, key, op, want in conds)


def parse_order(clauses: list[str], *, experiments: bool = False) -> list[tuple[str, str, bool]]:
    """[(entity, key, descending)]."""
    out = []
    for clause in clauses:
        toks = _tokens(clause)
        if not toks:
            continue
        (entity, key), i = _identifier(toks, 0, experiments=experiments)
        desc = False
        if i < len(toks):
            word = toks[i][1].upper()
            if word not in ("ASC", "DESC") or i + 1 != len(toks):
                raise BadFilter(f"order_by {clause!r}: expected KEY [ASC|DESC]")
            desc = word == "DESC"
        out.append((entity, key, desc))
    return out


def sort(objs: list[dict], order: list[tuple[str, str, bool]]) -> list[dict]:
    """Stable sorts from the last clause to the first; missing values always last."""
    for entity, key, desc in reversed(order):
        have = [o for o in objs if value_of(o, entity, key) is not None]
        missing = [o for o in objs if value_of(o, entity, key) is None]
        have.sort(key=lambda o, e=entity, k=key: _sort_key(value_of(o, e, k)), reverse=desc)
        objs = have + missing
    return objs


def _sort_key(v):
    if isinstance(v, int | float):
        return (0, -math.inf if math.isnan(v) else v, "")
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def page(items: list, max_results: int, token: str | None) -> tuple[list, str | None]:
    """One page and the token of the next (the offset, as text), or None at the end."""
    start = 0
    if token:
        if not token.isdigit():
            raise BadFilter(f"page_token {token[:40]!r} is not one this server gave out")
        start = int(token)
    end = start + max_results
    return items[start:end], (str(end) if end < len(items) else None)
