"""MLflow's wire format as this server speaks it: a call's arguments (the query string of a GET,
the JSON body of a POST), MLflow's error shape and codes, and MLflow's checks on names, values and
sizes, so a client hears what MLflow's own server would tell it."""

from __future__ import annotations

import json
import math
import re

# MLflow's own limits
NAME = re.compile(r"^[/\w.\- :]+$")
MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE = 250, 6000, 8000


class MlflowError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def bad(message: str) -> MlflowError:
    return MlflowError(400, "INVALID_PARAMETER_VALUE", message)


def missing(message: str) -> MlflowError:
    return MlflowError(404, "RESOURCE_DOES_NOT_EXIST", message)


def not_implemented(message: str) -> MlflowError:
    return MlflowError(501, "NOT_IMPLEMENTED", message)


def number_json(v: float):
    """A double as MLflow's JSON has it: NaN and infinities as strings."""
    if math.isfinite(v):
        return v
    return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")


def ms(seconds: float | None) -> int | None:
    return None if seconds is None or not math.isfinite(seconds) else int(round(seconds * 1000))


class Request:
    """One call's arguments: the query string of a GET, the JSON body of a POST."""

    def __init__(self, method: str, query: dict[str, list[str]], body: bytes):
        self.method = method
        if method == "GET":
            self.args: dict = {k: v if len(v) > 1 else v[0] for k, v in query.items() if v}
            self.lists = query
        else:
            try:
                args = json.loads(body or b"{}")
            except (ValueError, UnicodeDecodeError) as e:
                raise bad(f"the request body is not JSON: {e}") from None
            if not isinstance(args, dict):
                raise bad(f"the request body must be a JSON object, got {type(args).__name__}")
            self.args, self.lists = args, {}

    def str(self, name: str, *, required: bool = False, alias: str | None = None) -> str | None:
        v = self.args.get(name)
        if v is None and alias:
            v = self.args.get(alias)
        if v is None or v == "":
            if required:
                raise bad(f"missing value for required parameter '{name}'")
            return None
        if isinstance(v, list):
            raise bad(f"parameter '{name}' takes one value, got {len(v)}")
        return str(v)

    def int(self, name: str, *, default: int | None = None) -> int | None:
        v = self.args.get(name)
        if v is None or v == "":
            return default
        try:
            if isinstance(v, float) and not v.is_integer():
                raise ValueError
            return int(v)
        except (TypeError, ValueError):
            raise bad(f"parameter '{name}' must be an integer, got {v!r}") from None

    def list(self, name: str) -> list:
        if self.method == "GET":
            return list(self.lists.get(name, []))
        v = self.args.get(name, [])
        if not isinstance(v, list):
            raise bad(f"parameter '{name}' must be a list, got {type(v).__name__}")
        return v


def as_float(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise bad(f"{what} must be a number, got {v!r}")
    try:
        return float(v)
    except ValueError:
        raise bad(f"{what} must be a number, got {v!r}") from None


def as_int(v, what: str, default: int = 0) -> int:
    if v is None or v == "":
        return default
    try:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError
        return int(v)
    except (TypeError, ValueError):
        raise bad(f"{what} must be an integer, got {v!r}") from None


def check_name(kind: str, key) -> str:
    if not isinstance(key, str) or not key:
        raise bad(f"{kind} name must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY:
        raise bad(f"{kind} name '{key[:40]}...' is {len(key)} characters long; at most {MAX_KEY}")
    if not NAME.match(key) or "/../" in f"/{key}/" or key.startswith("/"):
        raise bad(f"invalid {kind} name: '{key}'. Names may only contain alphanumerics, underscores (_), dashes (-),"
                  " periods (.), spaces ( ), colons (:) and slashes (/), and may not be a path outside the run")
    return key


def key_value(item, kind: str, limit: int) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise bad(f"each {kind} must be an object with key and value, got {item!r}")
    key = check_name(kind, item.get("key"))
    value = item.get("value", "")
    if value is None:
        value = ""
    value = value if isinstance(value, str) else json.dumps(value)
    if len(value) > limit:
        raise bad(f"{kind} '{key}' has a value of {len(value)} characters; at most {limit}")
    return key, value
