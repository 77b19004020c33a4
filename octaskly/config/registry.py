"""The key registry: every configuration key with its table, kind and documentation.

Key names are unique across tables, so each maps to exactly one environment variable
(`OCTASKLY_` + the upper-case key) and one command-line flag. The loader, the argparse
integration and the template are all built from `KEYS`.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal

import pydantic
from pydantic.fields import FieldInfo

from octaskly.config import settings

ENV_PREFIX = "OCTASKLY_"
Kind = Literal["int", "float", "bool", "str", "list", "dict"]
DYNAMIC_DEFAULTS = {
    "worker_threads": "number of CPUs",
    "db_path": "<data dir>/octaskly.db",
    "data_dir": "directory of db_path, else ~/.octaskly",
    "work_dir": "the system temp dir ($TMPDIR, else /tmp)",
    "name": "host name",
    "cpu_cores": "detected",
    "memory": "detected",
    "gpu": "detected",
    "max_jobs": "number of CPUs",
}
SECRET_KEYS = frozenset({"secret_key", "token"})


@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration key: its table, its type and its documentation."""

    name: str
    table: str
    kind: Kind
    optional: bool
    field: FieldInfo

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def description(self) -> str:
        return self.field.description or ""

    @property
    def secret(self) -> bool:
        return self.name in SECRET_KEYS

    def default(self) -> Any:
        return self.field.get_default(call_default_factory=True)

    def default_text(self) -> str:
        """The default as a human reads it (`--help`, the template)."""
        if self.name in DYNAMIC_DEFAULTS:
            return DYNAMIC_DEFAULTS[self.name]
        value = self.default()
        if value is None:
            return "none"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, enum.Enum):
            return str(value.value)
        if isinstance(value, tuple | dict) and not value:
            return "empty"
        return str(value)


def _kind(annotation: Any) -> tuple[Kind, bool]:
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if optional:
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is tuple or origin is list:
        return "list", optional
    if origin is dict:
        return "dict", optional
    for kind, cls in (("bool", bool), ("int", int), ("float", float)):
        if annotation is cls:
            return typing.cast(Kind, kind), optional
    return "str", optional


def _registry() -> dict[str, Key]:
    keys: dict[str, Key] = {}
    for table, table_field in settings.Settings.model_fields.items():
        model = typing.cast(type[pydantic.BaseModel], table_field.annotation)
        for name, field in model.model_fields.items():
            kind, optional = _kind(field.annotation)
            keys[name] = Key(name=name, table=table, kind=kind, optional=optional, field=field)
    return keys


KEYS: dict[str, Key] = _registry()
TABLES: tuple[str, ...] = tuple(settings.Settings.model_fields)
