"""Configuration as text: the commented default file and the effective configuration.

`render_default_toml` is what `octaskly config init` writes; loading it gives exactly
the built-in defaults (keys without a fixed default are commented out).
`render_effective` is `octaskly config show`: every key, its value and its source,
with secrets masked.
"""

from __future__ import annotations

import enum
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import tomli_w

from octaskly.config import loading, registry, settings, values

_HEADER = """\
# octaskly configuration (written by `octaskly config init`).
#
# Precedence: command-line flag > environment variable > this file > built-in default.
# Every key has its own variable, named next to it (OCTASKLY_ + the key in capitals).
# Lines starting with '# key =' have no fixed default: remove the '#' to set them.
# Found at: --config FILE, $OCTASKLY_CONFIG, ./octaskly.toml, ~/.octaskly/octaskly.toml,
# /etc/octaskly/octaskly.toml (the first that exists).
"""


def toml_value(value: Any) -> str:
    """One value as TOML (strings escaped, arrays and tables inline)."""
    if isinstance(value, pydantic.SecretStr):
        value = value.get_secret_value()
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, Mapping):
        pairs = [f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).split(" = ", 1)[1].rstrip("\n")


def _toml_key(name: str) -> str:
    return tomli_w.dumps({name: 0}).rsplit(" = ", 1)[0]


def _table_keys(table: str) -> list[registry.Key]:
    return [key for key in registry.KEYS.values() if key.table == table]


def _table_doc(table: str) -> str:
    model = type(getattr(settings.Settings(), table))
    doc = (model.__doc__ or "").strip().splitlines()[0].split(": ", 1)[-1]
    return doc[:1].upper() + doc[1:]


def _key_comment(key: registry.Key) -> str:
    text = key.description.rstrip(".")
    options = loading.choices(key)
    if options and not all(option in text for option in options):
        text += f" ({', '.join(options)})"
    if key.name in registry.DYNAMIC_DEFAULTS:
        text += f"; default: {registry.DYNAMIC_DEFAULTS[key.name]}"
    lines = textwrap.wrap(text + ".", width=86)
    lines.append(f"env {key.env}, flag {loading.flag_names(key)[0]}")
    return "\n".join(f"# {line}" for line in lines)


def _key_line(key: registry.Key) -> str:
    default = key.default()
    if default is None or key.name in registry.DYNAMIC_DEFAULTS:
        examples = key.field.examples or []
        example = examples[0] if examples else default
        return f"# {key.name} = {toml_value(example)}"
    return f"{key.name} = {toml_value(default)}"


def render_default_toml() -> str:
    """A commented octaskly.toml holding every table and key with its default."""
    out = [_HEADER]
    for table in registry.TABLES:
        out.append(f"\n\n# {_table_doc(table)}\n[{table}]\n")
        for key in _table_keys(table):
            out.append(f"\n{_key_comment(key)}\n{_key_line(key)}\n")
    return "".join(out)


def _shown(key: registry.Key, value: Any) -> str:
    if key.secret or isinstance(value, pydantic.SecretStr):
        return f'"{values.MASK}"'
    if key.name == "db_url" and isinstance(value, str):
        return toml_value(values.display(key, value))
    return toml_value(value)


def render_effective(loaded: loading.Loaded, home: Path | None = None) -> str:
    """Every key with its effective value and source; secrets are shown as ********."""
    found = loaded.config_file or "none found"
    out = [f"# octaskly effective configuration (config file: {found})\n"]
    for table in registry.TABLES:
        out.append(f"\n[{table}]\n")
        model = getattr(loaded.settings, table)
        for key in _table_keys(table):
            value = getattr(model, key.name)
            source = loaded.sources.get(key.name, "default")
            if value is None:
                dynamic = registry.DYNAMIC_DEFAULTS.get(key.name)
                unset = f"(not set; {dynamic})" if dynamic else "(not set)"
                out.append(f"# {key.name} = {unset}  # {source}\n")
            else:
                out.append(f"{key.name} = {_shown(key, value)}  # {source}\n")
    data_dir = loaded.settings.data_dir(home)
    out.append(f"\n# data dir: {data_dir}\n")
    if loaded.settings.storage.db_url is None:
        out.append(f"# database: {loaded.settings.db_file(home)}\n")
    return "".join(out)
