"""The audit log's chain on real files: what verifies, and every way to break it that
`octaskly audit verify` must catch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from octaskly.services import auditing

SECRET = b"audit-test-secret-0123456789"


def write(tmp_path: Path, count: int = 5) -> Path:
    path = tmp_path / "logs" / "audit.log"
    log = auditing.AuditLog(path, SECRET)
    log.open()
    for i in range(count):
        log.record("task_submitted", action="submit", actor=f"user{i}", details={"n": i})
    log.close()
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_a_fresh_log_verifies_and_is_private(tmp_path: Path) -> None:
    path = write(tmp_path)
    verdict = auditing.verify(path, SECRET)
    assert verdict.ok, verdict.problems
    assert (verdict.entries, verdict.first_seq, verdict.last_seq) == (5, 1, 5)
    assert path.stat().st_mode & 0o777 == 0o600
    entry = json.loads(lines(path)[0])
    assert set(entry) == {*auditing._FIELDS, "hash"} and entry["actor"] == "user0"


def test_a_log_spanning_a_key_rotation_verifies_with_both_keys_only(tmp_path: Path) -> None:
    path = write(tmp_path, 3)
    rotated = b"rotated-audit-secret-0123456789"
    log = auditing.AuditLog(path, rotated)  # a restart after the rotation
    log.open()
    log.record("worker_joined", action="join", actor="w1")
    log.close()
    assert auditing.verify(path, [rotated, SECRET]).ok
    assert not auditing.verify(path, SECRET).ok
    assert not auditing.verify(path, rotated).ok
    assert not auditing.verify(path, [b"some-other-key-0123456789", rotated]).ok


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = write(tmp_path, 3)
    log = auditing.AuditLog(path, SECRET)
    log.open()
    log.record("worker_joined", action="join", actor="w1")
    log.close()
    verdict = auditing.verify(path, SECRET)
    assert verdict.ok and verdict.last_seq == 4


def _edit(path: Path, index: int, change: dict[str, object]) -> None:
    all_lines = lines(path)
    entry = json.loads(all_lines[index])
    entry.update(change)
    all_lines[index] = json.dumps(entry, separators=(",", ":"))
    path.write_text("\n".join(all_lines) + "\n")


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda p: _edit(p, 2, {"actor": "someone-else"}), "line 3 (seq 3): hash mismatch"),
        (lambda p: p.write_text("\n".join(lines(p)[:1] + lines(p)[2:]) + "\n"), "seq 3 where 2"),
        (lambda p: p.write_text("\n".join(lines(p)[:3]) + "\n"), "entries 4..5 are missing"),
        (lambda p: p.write_text("\n".join([lines(p)[1], lines(p)[0], *lines(p)[2:]]) + "\n"),
         "seq 2 where 1"),
        (lambda p: p.write_text(lines(p)[0] + "\nnot json\n" + "\n".join(lines(p)[1:]) + "\n"),
         "line 2: not an audit entry"),
    ],
)  # fmt: skip
def test_tampering_is_detected(tmp_path: Path, tamper: object, expected: str) -> None:
    path = write(tmp_path)
    tamper(path)  # type: ignore[operator]
    verdict = auditing.verify(path, SECRET)
    assert not verdict.ok
    assert any(expected in p for p in verdict.problems), verdict.problems


def test_a_rewritten_chain_without_the_key_is_detected(tmp_path: Path) -> None:
    """An attacker can recompute plain hashes, not our keyed ones."""
    path = write(tmp_path)
    forged = tmp_path / "forged" / "audit.log"
    forged_log = auditing.AuditLog(forged, b"attacker-key-0123456789")
    forged_log.open()
    for i in range(5):
        forged_log.record("task_submitted", action="submit", actor=f"user{i}")
    forged_log.close()
    verdict = auditing.verify(forged, SECRET)
    assert not verdict.ok and any("hash mismatch" in p for p in verdict.problems)
    assert auditing.verify(path, b"wrong-secret-0123456789").problems


def test_pruning_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = auditing.AuditLog(path, SECRET)
    log.open()
    for i in range(4):
        log.record("old", action="x", details={"i": i})
    log.flush()
    old = lines(path)
    # age the first four entries (re-signing them, as if written a year ago)
    rewritten, previous = [], auditing.GENESIS
    for raw in old:
        entry = json.loads(raw)
        entry["timestamp"] = auditing.now_rfc3339(time.time() - 365 * 86400)
        entry["hash"] = previous = auditing.chain_hash(auditing.audit_key(SECRET), previous, entry)
        rewritten.append(json.dumps(entry, separators=(",", ":")))
    path.write_text("\n".join(rewritten) + "\n")
    log.close()
    log = auditing.AuditLog(path, SECRET)
    log.open()  # continues from the last (re-signed) entry
    log.record("recent", action="y")
    log.close()
    assert auditing.verify(path, SECRET).ok
    log = auditing.AuditLog(path, SECRET)
    log.open()
    assert log.prune(time.time() - 30 * 86400) == 4
    log.record("after", action="z")
    log.close()
    kinds = [json.loads(x)["event_type"] for x in lines(path)]
    assert kinds == ["audit_checkpoint", "recent", "audit_pruned", "after"]
    verdict = auditing.verify(path, SECRET)
    assert verdict.ok, verdict.problems
    _edit(path, 0, {"details": {"pruned_through_seq": 1, "pruned_hash": "0" * 64}})
    assert not auditing.verify(path, SECRET).ok


def test_read_entries_newest_first_with_filter(tmp_path: Path) -> None:
    path = write(tmp_path, 6)
    page, total = auditing.read_entries(path, limit=2, offset=1)
    assert total == 6 and [e["seq"] for e in page] == [5, 4]
    page, total = auditing.read_entries(path, limit=10, offset=0, event_type="nothing")
    assert (page, total) == ([], 0)


def test_disabled_log_records_nothing(tmp_path: Path) -> None:
    log = auditing.AuditLog(None)
    log.open()
    log.record("x", action="y")
    log.close()
    assert list(tmp_path.iterdir()) == []
