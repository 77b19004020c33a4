"""The audit trail: one JSON object per line in `<data dir>/logs/audit.log` (0600).

Each entry has timestamp (RFC 3339, UTC), event_type, severity, actor, action, task_id,
details and source_ip. Entries are written and flushed as they happen, so a crash loses
none that were recorded. Never put a secret or a token in `details`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

Severity = Literal["info", "warning", "critical"]
FILE = Path("logs") / "audit.log"


class AuditLog:
    """Appends audit entries to a file; with `path=None` (audit_logging off) it records
    nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd: int | None = None

    def open(self) -> None:
        if self.path is None or self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def record(
        self,
        event_type: str,
        *,
        action: str,
        severity: Severity = "info",
        actor: str | None = None,
        task_id: str | None = None,
        details: dict[str, Any] | None = None,
        source_ip: str | None = None,
    ) -> None:
        if self.path is None:
            return
        entry = {
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            "event_type": event_type,
            "severity": severity,
            "actor": actor,
            "action": action,
            "task_id": task_id,
            "details": details or {},
            "source_ip": source_ip,
        }
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                self.open()
                assert self._fd is not None
                os.write(self._fd, line)
            except OSError as exc:  # the audit log must never take the dispatcher down
                log.error("could not write the audit log %s: %s", self.path, exc)


def source_ip(peer: str) -> str:
    """The address part of a HOST:PORT or [v6]:PORT peer string."""
    host = peer.rpartition(":")[0] or peer
    return host.strip("[]")
