"""Task working directories under one root, reused while they stay clean.

Making and removing a directory per task costs two file-system journal updates, and on a
busy disk (the dispatcher's fsyncs on the same file system) each can block the worker's
event loop for milliseconds. A worker therefore keeps the directories its runs left
empty and hands them to the next runs: every run still starts in an empty directory
(mode 0700) that no other run uses at the same time. A directory that is not exactly
that when its run ends (files left, permissions changed, replaced by a symlink) is
removed, off the event loop, and never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "octaskly-run-"


class Workdirs:
    """A pool of working directories under `root`, holding at most `keep` free ones;
    `owners` are more uids a clean directory may belong to (the users tasks run as).

    Use it from one event loop thread.
    """

    def __init__(self, root: Path, *, keep: int, owners: tuple[int, ...] = ()) -> None:
        self.root = Path(os.path.abspath(root))
        self.keep = keep
        self._free: list[Path] = []
        # A root worker hands workdirs to the users its tasks run as (nobody by default).
        self._owners = {os.geteuid(), *owners}

    def acquire(self) -> Path:
        """An empty private directory for one run; OSError if none can be made."""
        if self._free:
            return self._free.pop()
        return make_dir(self.root, PREFIX)

    async def release(self, path: Path) -> None:
        """Take a run's directory back: keep it if it is clean, else remove it."""
        if len(self._free) < self.keep and self._is_clean(path):
            self._free.append(path)
            return
        try:
            os.rmdir(path)  # an empty directory: one syscall, no thread
        except OSError:
            # In a thread: a task may leave a large tree behind; the loop must not stall.
            await asyncio.to_thread(remove_tree, path)

    def close(self) -> None:
        """Remove the free directories (they are empty)."""
        free, self._free = self._free, []
        for path in free:
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def _is_clean(self, path: Path) -> bool:
        try:
            st = os.lstat(path)
            if not (
                stat.S_ISDIR(st.st_mode)
                and st.st_uid in self._owners
                and stat.S_IMODE(st.st_mode) == 0o700
            ):
                return False
            with os.scandir(path) as entries:
                return next(entries, None) is None
        except OSError:
            return False


def make_dir(root: Path, prefix: str) -> Path:
    """A new private (0700) directory under `root`, creating `root` when missing.

    A `root` made here is 0711: others may pass through it (a sandboxed task's user must
    reach its own workdir) but not list it.
    """
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    except FileNotFoundError:  # first run with this root
        os.makedirs(root, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(root, 0o711)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def remove_tree(path: Path) -> None:
    if os.path.islink(path):  # the task replaced its directory: drop the link, never follow
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    # Without root, directories the task made unreadable or read-only block the removal.
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if not os.path.islink(child):
                with contextlib.suppress(OSError):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not remove the task workdir %s", path)
