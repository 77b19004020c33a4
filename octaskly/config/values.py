"""Values on their way into the settings: where each came from, its type, how to show it.

Strings from the environment and from flags are parsed by the key's kind; typed values
(TOML, or flags already converted by a caller) are type-checked strictly, so `port = "5555"`
in a file is a wrong type rather than silently accepted. Ranges, choices and formats are
left to the pydantic model; its errors are translated here into one-line messages naming
the key and where the value came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

import annotated_types
import pydantic
import pydantic_core

from octaskly import errors
from octaskly.config import registry, settings

MASK = "********"
Where = Literal["default", "file", "rust_log", "env", "flag"]
RANK: dict[Where, int] = {"default": 0, "file": 1, "rust_log": 2, "env": 3, "flag": 4}


class Problem(ValueError):
    """A value that cannot be used; the caller adds the key and the source."""


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a value came from: `name` is the flag, the variable or `FILE:LINE`."""

    where: Where
    name: str = ""

    @property
    def rank(self) -> int:
        return RANK[self.where]

    @property
    def label(self) -> str:
        """As `config show` prints it: `flag --port`, `env OCTASKLY_PORT`, `file F:12`."""
        prefix = {"rust_log": "env", "default": "default"}.get(self.where, self.where)
        return prefix if self.where == "default" else f"{prefix} {self.name}"


@dataclasses.dataclass(frozen=True)
class Value:
    """A value for one key, as given (`raw`) and as passed to the model (`value`)."""

    value: Any
    origin: Origin
    raw: Any = None


DEFAULT = Origin("default")


def display(key: registry.Key, value: Any) -> str:
    """A value as shown to people: secrets masked, passwords in URLs masked."""
    if value is None:
        return "(not set)"
    if key.secret:
        return MASK
    if isinstance(value, pydantic.SecretStr):
        return MASK
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = value if isinstance(value, str) else repr(value)
    return _mask_url_password(text) if key.name == "db_url" else text


def _literal(key: registry.Key, value: Any) -> str:
    """A value from a file as it was written there (TOML-like)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(display(key, value), ensure_ascii=False)
    return display(key, value)


def _mask_url_password(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.password is None:
        return text
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def describe(key: registry.Key, value: Value, problem: str) -> str:
    """One line naming the key, its source and the problem."""
    if value.origin.where == "file":
        shown = "" if key.secret or "(got " in problem else f" (got {_literal(key, value.raw)})"
        return f"{value.origin.name}: [{key.table}] {key.name}: {problem}{shown}"
    if value.origin.where in ("env", "rust_log", "flag"):
        return f"{value.origin.name}={display(key, value.raw)}: {problem}"
    return f"{key.name}: {problem}"


# -- parsing strings (environment, flags) ---------------------------------------------------
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def from_text(key: registry.Key, text: str) -> Any:
    """Parse a string from the environment or a flag by the key's kind."""
    if key.optional and text == "":
        return None
    if key.kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise Problem("expected an integer") from None
    if key.kind == "float":
        return _float(text)
    if key.kind == "bool":
        word = text.strip().lower()
        if word in _TRUE | _FALSE:
            return word in _TRUE
        raise Problem("expected true or false")
    if key.kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    if key.kind == "dict":
        return parse_pairs(text.split(","))
    return text


def _float(text: str) -> float:
    try:
        number = float(text.strip())
    except ValueError:
        raise Problem("expected a number") from None
    if not math.isfinite(number):
        raise Problem("expected a finite number")
    return number


def parse_pairs(items: list[str]) -> dict[str, str]:
    """`["k=v", "k2=v2"]` -> dict; empty items are skipped, a repeated key is an error."""
    pairs: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise Problem(f"expected KEY=VALUE (got {item!r})")
        if name.strip() in pairs:
            raise Problem(f"{name.strip()!r} given twice")
        pairs[name.strip()] = value.strip()
    return pairs


# -- checking typed values (TOML) -----------------------------------------------------------
_EXPECTED = {
    "int": "expected an integer",
    "float": "expected a number",
    "bool": "expected true or false",
    "str": "expected a string",
    "list": "expected a list of strings",
    "dict": 'expected a table of strings (k = "v")',
}


def check_typed(key: registry.Key, value: Any) -> Any:
    """Type-check a typed value strictly by the key's kind (no string-to-number guessing)."""
    if value is None and key.optional:
        return None
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list | tuple) and all(isinstance(v, str) for v in value),
        "dict": isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()),
    }[key.kind]
    if not ok:
        raise Problem(_EXPECTED[key.kind])
    if key.kind == "float" and not math.isfinite(value):
        raise Problem("expected a finite number")
    return dict(value) if key.kind == "dict" else value


# -- translating model errors ---------------------------------------------------------------
def _number(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _bounds(key: registry.Key) -> str | None:
    """`must be between 1 and 65535` from the field's Ge/Gt/Le constraints."""
    low = high = None
    for meta in key.field.metadata:
        if isinstance(meta, annotated_types.Ge):
            low = f"at least {_number(meta.ge)}"
        elif isinstance(meta, annotated_types.Gt):
            low = f"more than {_number(meta.gt)}"
        elif isinstance(meta, annotated_types.Le):
            high = _number(meta.le)
    if low is not None and high is not None:
        if low.startswith("at least"):
            return f"must be between {low.removeprefix('at least ')} and {high}"
        return f"must be {low} and at most {high}"
    if low is not None:
        return f"must be {low}"
    return f"must be at most {high}" if high is not None else None


def problem_text(key: registry.Key, error: pydantic_core.ErrorDetails) -> str:
    """pydantic's error as a short phrase, never echoing a secret."""
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return _bounds(key) or error["msg"]
    if kind in ("literal_error", "enum"):
        return f"must be {ctx.get('expected', '')}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"][:1].lower() + error["msg"][1:]


def translate(exc: pydantic.ValidationError, chosen: Mapping[str, Value]) -> errors.ConfigError:
    """The first model error as a ConfigError naming key(s) and source(s)."""
    lines = [_one(err, chosen) for err in exc.errors()]
    more = f" (and {len(lines) - 1} more problem(s))" if len(lines) > 1 else ""
    return errors.ConfigError(lines[0] + more)


def _one(error: pydantic_core.ErrorDetails, chosen: Mapping[str, Value]) -> str:
    loc = error["loc"]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, settings.KeysError):
        where = "; ".join(
            f"{k}: {chosen[k].origin.label if k in chosen else 'not set'}" for k in cause.keys
        )
        return f"{cause} ({where})"
    name = str(loc[1]) if len(loc) > 1 else str(loc[0])
    key = registry.KEYS.get(name)
    if key is None:
        return f"{'.'.join(str(p) for p in loc)}: {error['msg']}"
    value = chosen.get(name, Value(key.default(), DEFAULT, key.default()))
    return describe(key, value, problem_text(key, error))
