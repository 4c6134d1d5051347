"""Typed config sections: a field helper with ranges, and mapping -> dataclass with clear errors.

Components own their section (a small dataclass built with `option`); this module checks every
key and type and names the dotted path on any mistake. No ML framework is imported here.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import json
import math
import types
import typing
from dataclasses import field
from enum import Enum
from typing import Any

from common.errors import ConfigError


def option(default: Any, *, min: float | None = None, max: float | None = None, help: str = "") -> Any:
    """A field with an optional inclusive range; `help` documents it in one place. Floats must be
    finite and integers within INT_LIMIT even where no range is given."""
    meta = {"min": min, "max": max, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# No option needs more: keeps every integer a valid SQLite/C int64 and exact in JSON (2**53).
INT_LIMIT = 2**53

# Ranges sections share; past these a value is a typo, not a plan.
MAX_STEPS = 10**9  # optimizer steps (and step intervals)
MAX_WORKERS = 100_000  # ranks
MAX_SECONDS = 30 * 86400.0  # timeouts and periods: a month (thread waits refuse ~2**33 s)


def build(cls: type, raw: Any, path: str, where: str) -> Any:
    """Turn a mapping into dataclass `cls`, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {path or 'top level'}: expected a mapping, got {kind(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {(path + '.' if path else '') + close[0]}?" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"{where}: unknown key {dotted}{hint} (valid keys here: {valid})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        dotted = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(raw[name], hints[name], dotted, where, f.metadata)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, path: str, where: str, meta: typing.Mapping[str, Any]) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, path, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, path, where, meta)
    if isinstance(tp, type) and issubclass(tp, Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise ConfigError(f"{where}: {path}: expected one of {allowed}, got {value!r}")
        return tp(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {path}: expected a list, got {kind(value)}")
        return [_coerce(v, args[0], f"{path}[{i}]", where, {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path}: expected a mapping, got {kind(value)}")
        return dict(value)
    if tp is Any:
        return value
    raw = value
    if tp is float and isinstance(value, str):
        value = _float_or_same(value)  # PyYAML reads 1e-4 (no dot) as a string
    if tp is int:
        value = _int_or_same(value)
    ok = {
        bool: isinstance(value, bool),
        # a float here is past INT_LIMIT (or inf): the range check below refuses it
        int: isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and abs(value) > INT_LIMIT,
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{where}: {path}: expected {_type_name(tp)}, got {kind(value)} {value!r}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {path}: expected a finite number, got {raw!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if tp is int:
        lo = -INT_LIMIT if lo is None else lo
        hi = INT_LIMIT if hi is None else hi
    if lo is not None and value < lo:
        raise ConfigError(f"{where}: {path}: expected a value >= {bound(lo)}, got {_show(raw)}")
    if hi is not None and value > hi:
        rng = f"<= {bound(hi)}" if lo is None else f"between {bound(lo)} and {bound(hi)}"
        raise ConfigError(f"{where}: {path}: expected a value {rng}, got {_show(raw)}")
    return value


def bound(value: float) -> str:
    """A range end as people write it: 2592000, not 2592000.0."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _show(value) -> str:
    # a 10**26 typed out in full is no easier to read than 1e+26
    return f"{value:.6g}" if isinstance(value, int) and abs(value) >= 10**20 else repr(value)


def _float_or_same(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _int_or_same(value):
    """An integral number written as 1e6, '1e6' or 1000.0 -> 1000000; past INT_LIMIT a float (maybe
    inf) that the range check refuses; anything else unchanged (and refused as not an integer)."""
    if isinstance(value, str):
        try:
            number = decimal.Decimal(value.strip())
        except decimal.InvalidOperation:
            return value
        if not number.is_finite():
            return value
        if number.adjusted() > 15:  # past INT_LIMIT; never int(): 1e999999999 has a billion digits
            return float(number)
        return int(number) if number == number.to_integral_value() else value
    if isinstance(value, float) and (value.is_integer() or math.isinf(value)):
        return int(value) if abs(value) <= INT_LIMIT else value
    return value


def _type_name(tp: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[tp]


def kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf field, for the generated reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, path + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = default.value if isinstance(default, Enum) else default
        meta = f.metadata
        bounds = []
        if meta.get("min") is not None:
            bounds.append(f">= {bound(meta['min'])}")
        if meta.get("max") is not None:
            bounds.append(f"<= {bound(meta['max'])}")
        if isinstance(tp, type) and issubclass(tp, Enum):
            bounds.append(" / ".join(m.value for m in tp))
        help_text = meta.get("help", "") + (f" ({', '.join(bounds)})" if bounds else "")
        rows.append((path, _type_label(tp), json.dumps(default), help_text.strip()))
    return rows


def _type_label(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_type_label(inner[0])} or null"
    if origin is list:
        return f"list of {_type_label(args[0])}"
    if origin is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "choice"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))
