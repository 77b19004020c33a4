"""Build the one settings object: flag > environment > TOML file > built-in default.

`load` is called once at the entry point; `add_flags` / `flags_from_namespace` connect it
to argparse, so `--help` shows each flag's variable and default, and only the flags the
user actually passed take part. Every bad value is a `ConfigError` naming the key and
where the value came from (`FILE:LINE`, `OCTASKLY_PORT=…`, `--port=…`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic

from octaskly import errors
from octaskly.config import files, registry, settings, values

# Variables with the prefix that the product sets for other purposes (task environment).
IGNORED_ENV = frozenset(
    {files.CONFIG_ENV, "OCTASKLY_TASK_ID", "OCTASKLY_ATTEMPT", "OCTASKLY_WORKDIR"}
)
RUST_LOG = "RUST_LOG"
FLAG_NAMES = {"bind_address": ("--bind", "--bind-address"), "labels": ("--label",)}
EXCLUSIVE = (("secret_key", "secret_key_file"), ("db_path", "db_url"))
_METAVARS = {
    "port": "PORT",
    "api_port": "PORT",
    "bind_address": "ADDR",
    "dispatcher_addr": "HOST:PORT[,HOST:PORT]",
    "primary_addr": "HOST:PORT",
    "labels": "KEY=VALUE",
    "memory": "MB",
    "secret_key": "KEY",
    "db_url": "URL",
    "api_url": "URL",
    "whitelist": "NAME[,NAME]",
}
_DEST = "octaskly_config."


@dataclasses.dataclass(frozen=True)
class Loaded:
    """The settings plus, per key, where its value came from (for `config show`)."""

    settings: settings.Settings
    sources: dict[str, str]
    config_file: Path | None = None
    warnings: tuple[str, ...] = ()


def load(
    *,
    flags: Mapping[str, object],
    env: Mapping[str, str] = os.environ,
    config_file: str | None = None,
    cwd: Path | None = None,
    home: Path | None = None,
    system_config: Path = files.SYSTEM_CONFIG,
) -> Loaded:
    """Settings from `flags` (only those passed; typed or raw strings), `env`, the config
    file (see `files.discover`) and the defaults. Raises ConfigError on any bad value."""
    path = files.discover(
        config_file=config_file,
        env=env,
        cwd=cwd if cwd is not None else Path.cwd(),
        home=home if home is not None else Path.home(),
        system_config=system_config,
    )
    warnings: list[str] = []
    chosen: dict[str, values.Value] = {}
    if path is not None:
        chosen.update(_file_layer(path))
    chosen.update(_rust_log_layer(env, warnings))
    chosen.update(_env_layer(env, warnings))
    chosen.update(_flag_layer(flags))
    overridden = _drop_overridden(chosen)
    try:
        data: dict[str, dict[str, Any]] = {table: {} for table in registry.TABLES}
        for name, value in chosen.items():
            data[registry.KEYS[name].table][name] = value.value
        built = settings.Settings.model_validate(data)
    except pydantic.ValidationError as exc:
        raise values.translate(exc, chosen) from None
    sources = {
        name: chosen[name].origin.label if name in chosen else "default" for name in registry.KEYS
    }
    sources.update(overridden)
    return Loaded(built, sources, path, tuple(warnings))


def check_file(path: Path) -> settings.Settings:
    """Validate one configuration file on its own (no flags, no environment)."""
    return load(flags={}, env={}, config_file=str(path)).settings


# -- layers ---------------------------------------------------------------------------------
def _checked(key: registry.Key, raw: Any, origin: values.Origin) -> values.Value:
    try:
        from_text = origin.where != "file"
        repeated = from_text and isinstance(raw, list) and key.kind in ("list", "dict")
        if from_text and isinstance(raw, str):
            value = values.from_text(key, raw)
        elif repeated and key.kind == "dict":  # --label a=b --label c=d
            value = values.parse_pairs([str(item) for item in raw])
        elif repeated:  # --dispatcher-addr a:1,b:2 --dispatcher-addr c:3
            value = [part for item in raw for part in values.from_text(key, str(item))]
        else:
            value = values.check_typed(key, raw)
    except values.Problem as exc:
        message = values.describe(key, values.Value(raw, origin, raw), str(exc))
        raise errors.ConfigError(message) from None
    return values.Value(value, origin, raw)


def _file_layer(path: Path) -> dict[str, values.Value]:
    doc = files.read(path)
    layer: dict[str, values.Value] = {}
    for name, raw, where in files.entries(doc):
        layer[name] = _checked(registry.KEYS[name], raw, values.Origin("file", where))
    return layer


def _env_layer(env: Mapping[str, str], warnings: list[str]) -> dict[str, values.Value]:
    by_env = {key.env: key for key in registry.KEYS.values()}
    layer: dict[str, values.Value] = {}
    for var in sorted(env):
        if not var.startswith(registry.ENV_PREFIX) or var in IGNORED_ENV:
            continue
        key = by_env.get(var)
        if key is None:
            # Compare without the shared prefix, or everything looks alike.
            match = files.closest(var.removeprefix(registry.ENV_PREFIX).lower(), registry.KEYS)
            hint = f' — did you mean "{registry.KEYS[match].env}"?' if match else ""
            warnings.append(f"ignoring unknown environment variable {var}{hint}")
            continue
        layer[key.name] = _checked(key, env[var], values.Origin("env", var))
    return layer


_RUST_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "off": "error",
}


def parse_rust_log(text: str) -> tuple[str | None, list[str]]:
    """The level `RUST_LOG` asks for octaskly, and the directives that could not be read.

    `octaskly=LEVEL` (or `octaskly::module=LEVEL`) wins over the first bare level;
    trace maps to debug, warn to warning, off to error.
    """
    ours = bare = None
    bad: list[str] = []
    for directive in (d.split("/", 1)[0].strip() for d in text.split(",")):
        if not directive:
            continue
        target, sep, level_text = directive.rpartition("=")
        level = _RUST_LEVELS.get(level_text.strip().lower())
        if not sep and level is None and directive.split("::")[0] == "octaskly":
            ours = ours or "debug"  # a bare target means every level for it
        elif level is None or (sep and not target.strip()):
            bad.append(directive)
        elif not sep:
            bare = bare or level
        elif target.strip().split("::")[0] == "octaskly":
            ours = ours or level
    return ours or bare, bad


def _rust_log_layer(env: Mapping[str, str], warnings: list[str]) -> dict[str, values.Value]:
    text = env.get(RUST_LOG, "")
    if not text.strip():
        return {}
    level, bad = parse_rust_log(text)
    if bad:
        warnings.append(
            f"{RUST_LOG}={text}: ignoring {', '.join(bad)} "
            "(expected a level such as info, or octaskly=debug)"
        )
    if level is None:
        return {}
    return {"log_level": values.Value(level, values.Origin("rust_log", RUST_LOG), text)}


def _flag_layer(flags: Mapping[str, object]) -> dict[str, values.Value]:
    layer: dict[str, values.Value] = {}
    for name, raw in flags.items():
        key = registry.KEYS.get(name)
        if key is None:
            raise errors.ConfigError(f"unknown setting {name!r}")
        layer[name] = _checked(key, raw, values.Origin("flag", flag_names(key)[0]))
    return layer


def _drop_overridden(chosen: dict[str, values.Value]) -> dict[str, str]:
    """Of two mutually exclusive keys set at different levels, the higher level wins
    (`--secret-key` beats the file's `secret_key_file`); at the same level it is an error,
    left to the model."""
    notes: dict[str, str] = {}
    for first, second in EXCLUSIVE:
        a, b = chosen.get(first), chosen.get(second)
        if a is None or b is None or a.value is None or b.value is None:
            continue
        if a.origin.rank == b.origin.rank:
            continue
        loser, winner = (first, second) if a.origin.rank < b.origin.rank else (second, first)
        notes[loser] = f"default ({chosen[loser].origin.label} overridden by {winner})"
        del chosen[loser]
    return notes


# -- argparse -------------------------------------------------------------------------------
def flag_names(key: registry.Key) -> tuple[str, ...]:
    """The option strings of a key: `--api-port` for `api_port`, `--bind` for bind_address."""
    return FLAG_NAMES.get(key.name, ("--" + key.name.replace("_", "-"),))


def choices(key: registry.Key) -> tuple[str, ...]:
    """The allowed values of a key with a fixed set of them, else ()."""
    annotation = key.field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(str(member.value) for member in annotation)
    return ()


def _metavar(key: registry.Key) -> str:
    if key.name in _METAVARS:
        return _METAVARS[key.name]
    if key.kind == "bool":
        return "true|false"
    if options := choices(key):
        return "|".join(options)
    if "Path" in str(key.field.annotation):
        return "PATH"
    if key.kind == "float" and "seconds" in key.description.lower():
        return "SECONDS"
    return "N" if key.kind in ("int", "float") else key.name.upper()


def flag_dest(key: str) -> str:
    """The argparse attribute a key's flag is stored in (present only when given)."""
    return _DEST + key


def add_flags(parser: argparse.ArgumentParser, keys: Sequence[str]) -> None:
    """Add one option per configuration key; only flags the user passes reach `load`."""
    for name in dict.fromkeys(keys):
        key = registry.KEYS[name]
        description = key.description.replace("%", "%%")
        repeat = "repeatable; " if key.kind in ("list", "dict") else ""
        parser.add_argument(
            *flag_names(key),
            dest=_DEST + name,
            default=argparse.SUPPRESS,
            action="append" if key.kind in ("list", "dict") else "store",
            metavar=_metavar(key),
            help=f"{description} ({repeat}env {key.env}, default {key.default_text()})",
        )


def flags_from_namespace(ns: argparse.Namespace) -> dict[str, object]:
    """The configuration flags the user passed, by key, for `load(flags=...)`."""
    return {
        name.removeprefix(_DEST): value
        for name, value in vars(ns).items()
        if name.startswith(_DEST)
    }
