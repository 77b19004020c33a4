"""The audit trail: `<data dir>/logs/audit.log`, one JSON object per line, file mode 0600.

Each entry has timestamp (RFC 3339, UTC), event_type, severity, actor, action, task_id,
details and source_ip, plus `seq` (1, 2, 3 …) and `hash`: an HMAC-SHA256, keyed with a
key derived from the cluster secret, over the previous entry's hash and this entry. So
an edited line, a deleted line, a reordering or a forged line breaks the chain from that
point on, and nobody without the cluster key can write a chain that verifies. The latest
seq and hash are also kept, MAC'd, in `audit.head`: a log cut short at the end is caught
too. `octaskly audit verify` checks all of it.

Retention: entries older than `log_retention_days` are pruned by rewriting the file to
start with a `audit_checkpoint` entry that records the last pruned seq and hash; the
chain continues from it, so pruning never breaks verification.

Entries are buffered for at most one event-loop iteration and written with one write()
call; never put a secret or a token in `details`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from octaskly import files
from octaskly.protocol import auth

log = logging.getLogger(__name__)

Severity = Literal["info", "warning", "critical"]
FILE = Path("logs") / "audit.log"
HEAD_SUFFIX = ".head"
GENESIS = "0" * 64
_FIELDS = ("timestamp", "event_type", "severity", "actor", "action", "task_id", "details",
           "source_ip", "seq")  # fmt: skip


def audit_key(secret: bytes) -> bytes:
    return auth.derive_key(secret, "audit-log")


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: entry[k] for k in _FIELDS}, sort_keys=True, separators=(",", ":"), default=str
    ).encode()


def chain_hash(key: bytes, previous: str, entry: dict[str, Any]) -> str:
    return hmac.new(key, previous.encode() + b"\n" + _canonical(entry), hashlib.sha256).hexdigest()


def _head_mac(key: bytes, seq: int, digest: str) -> str:
    return hmac.new(key, f"head:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


def now_rfc3339(ts: float | None = None) -> str:
    moment = (
        datetime.datetime.now(datetime.UTC)
        if ts is None
        else datetime.datetime.fromtimestamp(ts, datetime.UTC)
    )
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends hash-chained entries; with `path=None` (audit_logging off) it records
    nothing. Use from one event loop; `record` never raises."""

    def __init__(self, path: Path | None, secret: bytes = b"") -> None:
        self.path = path
        self._key = audit_key(secret) if path is not None else b""
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0
        self._last = GENESIS
        self._buffer: list[bytes] = []
        self._flush_scheduled = False

    # -- lifecycle --------------------------------------------------------------------------
    def open(self) -> None:
        if self.path is None or self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._seq, self._last = _tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(self._fd, 0o600)

    def close(self) -> None:
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # -- writing ----------------------------------------------------------------------------
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
        entry: dict[str, Any] = {
            "timestamp": now_rfc3339(),
            "event_type": event_type,
            "severity": severity,
            "actor": actor,
            "action": action,
            "task_id": task_id,
            "details": details or {},
            "source_ip": source_ip,
        }
        with self._lock:
            self._seq += 1
            entry["seq"] = self._seq
            entry["hash"] = self._last = chain_hash(self._key, self._last, entry)
            self._buffer.append(
                (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
            )
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop (CLI, tests): write at once
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._flush_scheduled = False
            if not self._buffer:
                return
            data, self._buffer = b"".join(self._buffer), []
            seq, last = self._seq, self._last
            try:
                self.open()
                assert self._fd is not None and self.path is not None
                try:
                    _append_whole(self._fd, data)
                except OSError:
                    self._buffer.insert(0, data)  # (disk full) written with the next flush
                    raise
                _write_head(self.path, self._key, seq, last)
            except OSError as exc:  # the audit log must never take the dispatcher down
                log.error("could not write the audit log %s: %s", self.path, exc)

    # -- retention ----------------------------------------------------------------------------
    def prune(self, older_than: float) -> int:
        """Drop entries with a timestamp before `older_than` (epoch seconds); the file then
        starts with a checkpoint carrying the chain on. Returns how many were dropped."""
        if self.path is None:
            return 0
        self.flush()
        cutoff = now_rfc3339(older_than)
        with self._lock:
            lines = self.path.read_bytes().splitlines(keepends=True) if self.path.exists() else []
            keep_from = 0
            for i, line in enumerate(lines):
                entry = json.loads(line)
                if entry["timestamp"] >= cutoff and entry["event_type"] != "audit_checkpoint":
                    break
                keep_from = i + 1
            dropped = [json.loads(x) for x in lines[:keep_from]]
            real = [e for e in dropped if e["event_type"] != "audit_checkpoint"]
            if not real:
                return 0
            last = dropped[-1]
            checkpoint: dict[str, Any] = {
                "timestamp": now_rfc3339(),
                "event_type": "audit_checkpoint",
                "severity": "info",
                "actor": "dispatcher",
                "action": "prune audit log",
                "task_id": None,
                "details": {
                    "pruned_through_seq": last["seq"],
                    "pruned_hash": last["hash"],
                    "pruned_entries": len(real),
                    "older_than": cutoff,
                },
                "source_ip": None,
                "seq": last["seq"],  # the checkpoint stands in for the last pruned entry
            }
            checkpoint["hash"] = chain_hash(self._key, last["hash"], checkpoint)
            # The entry after the checkpoint chains from the pruned entry's hash; the
            # checkpoint (MAC'd) vouches for that hash, so verify resumes from it.
            head = (json.dumps(checkpoint, separators=(",", ":")) + "\n").encode()
            files.write_private(self.path, head + b"".join(lines[keep_from:]))
            if self._fd is not None:  # reopen the new file for appending
                os.close(self._fd)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND, 0o600)
        self.record(
            "audit_pruned",
            action="prune audit log",
            actor="dispatcher",
            details={"pruned_entries": len(real), "older_than": cutoff},
        )
        return len(real)


def _tail(path: Path) -> tuple[int, str]:
    """The seq and hash of the last entry in `path` (0 and GENESIS if none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return 0, GENESIS
    for line in reversed(lines):
        try:
            entry = json.loads(line)
            return int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0, GENESIS


def _append_whole(fd: int, data: bytes) -> None:
    """Append all of `data` or nothing: a write cut short (disk full) is undone, so a torn
    line never breaks the chain."""
    start = os.lseek(fd, 0, os.SEEK_END)
    done = 0
    try:
        while done < len(data):
            written = os.write(fd, data[done:])
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def _write_head(path: Path, key: bytes, seq: int, digest: str) -> None:
    head = path.with_name(path.name + HEAD_SUFFIX)
    text = json.dumps({"seq": seq, "hash": digest, "mac": _head_mac(key, seq, digest)})
    fd = os.open(head, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, text.encode().ljust(256), 0)
    finally:
        os.close(fd)


# -- verification -------------------------------------------------------------------------------
@dataclasses.dataclass
class Verdict:
    entries: int = 0
    first_seq: int = 0
    last_seq: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path, secret: bytes | Sequence[bytes]) -> Verdict:
    """Check the chain of `path` and its head file; every problem, with its line.

    Several secrets (a key file during or after a rotation): each entry may be keyed by
    any of them — a dispatcher keys its entries with the key it started with."""
    secrets = [secret] if isinstance(secret, bytes) else list(secret)
    keys = [audit_key(s) for s in secrets]
    verdict = Verdict()
    previous, expected_seq = GENESIS, 1
    for number, raw in _lines(path):
        try:
            entry = json.loads(raw)
            seq, digest = int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError):
            verdict.problems.append(f"line {number}: not an audit entry")
            continue
        if number == 1 and entry.get("event_type") == "audit_checkpoint":
            details = entry.get("details") or {}
            previous = str(details.get("pruned_hash", ""))
            if not any(chain_hash(k, previous, entry) == digest for k in keys):
                verdict.problems.append("line 1: the retention checkpoint does not verify")
            # the next entry chains from the last pruned one, which the checkpoint vouches for
            previous, expected_seq = str(details.get("pruned_hash")), seq + 1
            verdict.first_seq = seq + 1
            continue
        if seq != expected_seq:
            verdict.problems.append(
                f"line {number}: seq {seq} where {expected_seq} was expected "
                "(entries deleted or reordered)"
            )
        if not any(chain_hash(k, previous, entry) == digest for k in keys):
            verdict.problems.append(
                f"line {number} (seq {seq}): hash mismatch: this entry was edited, or an "
                "entry before it was deleted or forged"
            )
        verdict.entries += 1
        verdict.first_seq = verdict.first_seq or seq
        verdict.last_seq = seq
        previous, expected_seq = digest, seq + 1
    _check_head(path, keys, verdict, previous)
    return verdict


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, line.rstrip(b"\n")


def _check_head(path: Path, keys: list[bytes], verdict: Verdict, last_hash: str) -> None:
    head = path.with_name(path.name + HEAD_SUFFIX)
    try:
        data = json.loads(head.read_bytes().strip() or b"{}")
        seq, digest, mac = int(data["seq"]), str(data["hash"]), str(data["mac"])
    except FileNotFoundError:
        verdict.problems.append(f"{head.name} is missing: cannot tell whether the end was cut")
        return
    except (ValueError, KeyError, TypeError):
        verdict.problems.append(f"{head.name} is unreadable")
        return
    if not any(hmac.compare_digest(_head_mac(k, seq, digest), mac) for k in keys):
        verdict.problems.append(f"{head.name} does not verify (edited, or another key)")
    elif seq > verdict.last_seq:
        verdict.problems.append(
            f"entries {verdict.last_seq + 1}..{seq} are missing from the end of the log"
        )
    elif seq == verdict.last_seq and digest != last_hash:
        verdict.problems.append("the last entry does not match the head")


def read_entries(
    path: Path, *, limit: int, offset: int, event_type: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Entries newest first (a page of them) and how many match."""
    matching: list[dict[str, Any]] = []
    try:
        for _, raw in _lines(path):
            entry = json.loads(raw)
            if event_type is None or entry.get("event_type") == event_type:
                matching.append(entry)
    except FileNotFoundError:
        return [], 0
    matching.reverse()
    return matching[offset : offset + limit], len(matching)


def source_ip(peer: str) -> str:
    """The address part of a HOST:PORT or [v6]:PORT peer string."""
    host = peer.rpartition(":")[0] or peer
    return host.strip("[]")
