"""Configuration files: which one is used, reading it, and the line each key is on.

`tomllib` reports no positions for keys, so a small scan of the text (table headers,
`key =` lines, dotted and quoted keys, skipping multi-line strings) finds them; errors
can then say `FILE:LINE`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from octaskly import errors
from octaskly.config import registry

FILE_NAME = "octaskly.toml"
SYSTEM_CONFIG = Path("/etc/octaskly") / FILE_NAME
CONFIG_ENV = "OCTASKLY_CONFIG"

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_KEY = re.compile(rf"^\s*({_DOTTED})\s*=")
_SPLIT = re.compile(_PART)
_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def discover(
    *,
    config_file: str | None,
    env: Mapping[str, str],
    cwd: Path,
    home: Path,
    system_config: Path = SYSTEM_CONFIG,
) -> Path | None:
    """The file to read: `--config`, `$OCTASKLY_CONFIG`, `./octaskly.toml`,
    `~/.octaskly/octaskly.toml`, the system file; the first that exists, else None.

    A file named explicitly (flag or variable) that does not exist is a ConfigError.
    """
    for named, via in ((config_file, "--config"), (env.get(CONFIG_ENV), CONFIG_ENV)):
        if named:
            path = cwd / Path(named).expanduser()
            if not path.is_file():
                problem = "is not a file" if path.exists() else "does not exist"
                raise errors.ConfigError(f"config file {path} (from {via}) {problem}")
            return path
    for candidate in (cwd / FILE_NAME, home / ".octaskly" / FILE_NAME, system_config):
        if candidate.is_file():
            return candidate
    return None


@dataclasses.dataclass(frozen=True)
class Document:
    """A parsed TOML file and the line on which each table and key starts."""

    path: Path
    data: dict[str, Any]
    lines: dict[tuple[str, ...], int]

    def where(self, *keys: str) -> str:
        """`FILE:LINE` of the key path (or its nearest enclosing table), else `FILE`."""
        while keys:
            if keys in self.lines:
                return f"{self.path}:{self.lines[keys]}"
            keys = keys[:-1]
        return str(self.path)


def read(path: Path) -> Document:
    """Read and parse one TOML file; unreadable files and syntax errors are ConfigErrors."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise errors.ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise errors.ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        position = _POSITION.search(message)
        if position is None:
            raise errors.ConfigError(f"{path}: invalid TOML: {message}") from None
        line, column = position.groups()
        reason = message[: position.start()]
        raise errors.ConfigError(f"{path}:{line}:{column}: invalid TOML: {reason}") from None
    return Document(path=path, data=data, lines=index_lines(text))


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _SPLIT.findall(dotted))


def index_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each table path and key path to the (1-based) line where it first appears."""
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if in_string is not None:
            if line.count(in_string) % 2:
                in_string = None
            continue
        header = _HEADER.match(line)
        if header:
            table = _parts(header.group(1))
            found.setdefault(table, number)
        elif key := _KEY.match(line):
            path = table + _parts(key.group(1))
            for end in range(len(table) + 1, len(path) + 1):
                found.setdefault(path[:end], number)
        in_string = next((d for d in ('"""', "'''") if line.count(d) % 2), None)
    return found


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `word`, if any is close enough to be a typo."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """` — did you mean "port"?` when a close match exists, else ``."""
    match = closest(word, candidates)
    return f' — did you mean "{match}"?' if match else ""


def entries(doc: Document) -> list[tuple[str, Any, str]]:
    """(key, value, `FILE:LINE`) for every key, after checking tables and key placement."""
    found: list[tuple[str, Any, str]] = []
    for table, body in doc.data.items():
        where = doc.where(table)
        if table in registry.KEYS:
            home = registry.KEYS[table].table
            raise errors.ConfigError(f'{where}: key "{table}" must be in the [{home}] table')
        if table not in registry.TABLES:
            match = closest(table, registry.TABLES)
            hint = f" — did you mean [{match}]?" if match else ""
            raise errors.ConfigError(f"{where}: unknown table [{table}]{hint}")
        if not isinstance(body, dict):
            raise errors.ConfigError(f"{where}: {table} must be a table ([{table}])")
        for name, value in body.items():
            found.append((_placed(doc, table, name), value, doc.where(table, name)))
    return found


def _placed(doc: Document, table: str, name: str) -> str:
    key = registry.KEYS.get(name)
    where = doc.where(table, name)
    if key is None:
        own = [k for k, v in registry.KEYS.items() if v.table == table]
        hint = suggestion(name, own)
        if not hint and (other := closest(name, registry.KEYS)):
            hint = f' — did you mean "{other}" (in [{registry.KEYS[other].table}])?'
        raise errors.ConfigError(f'{where}: unknown key "{name}" in [{table}]{hint}')
    if key.table != table:
        raise errors.ConfigError(
            f'{where}: key "{name}" belongs in [{key.table}], not in [{table}]'
        )
    return name
