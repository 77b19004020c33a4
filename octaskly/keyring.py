"""The cluster key, and the keys still accepted while it is being rotated.

A key file holds one key per line: the first is the current key (it signs tokens and
proves this node to others); the ones after it are still accepted from others (during
a rotation's grace period, e.g. while the Kubernetes operator rolls a new key out). A
node re-reads the file when it changes (a dispatcher every few seconds, a worker before
each handshake) — a mounted Secret is updated in place — and
keeps its old keys if the new file is unreadable or malformed (saying so in the log).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from octaskly import errors

log = logging.getLogger(__name__)
MIN_LENGTH = 16


def parse(data: bytes, where: str) -> list[bytes]:
    """The keys of a key file's content; ConfigError naming `where` if there are none or
    one is too short."""
    # (only line ends are removed: a key is exactly its line; blank lines are skipped)
    keys = [line.rstrip(b"\r") for line in data.split(b"\n") if line.strip()]
    if not keys:
        raise errors.ConfigError(f"{where}: file is empty")
    for key in keys:
        if len(key) < MIN_LENGTH:
            raise errors.ConfigError(f"{where}: the key must be at least {MIN_LENGTH} characters")
    return list(dict.fromkeys(keys))


class Keyring:
    def __init__(self, keys: list[bytes], path: Path | None = None) -> None:
        if not keys:
            raise ValueError("a keyring needs a key")
        self._keys = list(keys)
        self.path = path
        self.generation = 0
        self._stamp = self._file_stamp()
        self._derived: dict[tuple[str, int], list[bytes]] = {}

    @classmethod
    def single(cls, key: bytes) -> Keyring:
        return cls([key])

    @property
    def current(self) -> bytes:
        return self._keys[0]

    @property
    def accepted(self) -> list[bytes]:
        return list(self._keys)

    def derived(self, purpose: str, derive: Callable[[bytes], bytes]) -> list[bytes]:
        """`derive` of every accepted key (current first), cached per generation."""
        cache_key = (purpose, self.generation)
        found = self._derived.get(cache_key)
        if found is None:
            found = self._derived[cache_key] = [derive(k) for k in self._keys]
        return found

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload_if_changed(self) -> bool:
        """Re-read the key file if it changed; True if the keys changed."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keys = parse(self.path.read_bytes(), f"secret_key_file {self.path}")
        except (OSError, errors.ConfigError) as exc:
            log.error("keeping the current keys: cannot use the changed key file: %s", exc)
            return False
        if keys == self._keys:
            return False
        previous = self._keys
        self._keys = keys
        self.generation += 1
        self._derived.clear()
        log.warning(
            "key file %s changed: %d key(s) accepted, the current one %s",
            self.path,
            len(keys),
            "unchanged" if keys[0] == previous[0] else "replaced",
        )
        return True
