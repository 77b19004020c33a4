"""What streaming replication moves: a database's position, and one committed change.

A primary numbers every write transaction that changed something (`lsn`, kept in the
database in the same transaction). With capture on, the writer reads back the full rows
that transaction touched, right after its commit and before the next one begins, so a
`Change` is exactly the transaction's effect. A standby applies changes in order, one
transaction each (several per commit when they queue up), and stores the primary's `lsn`
with them: its position then says precisely which of the primary's transactions it has.

Row images rather than statements: applying one is idempotent and needs no knowledge of
the compare-and-set logic that produced it. Deleted tasks (retention) travel as their ids;
deleting one again, or one the standby never had, changes nothing. A bytes value (a task's
output) travels as ``{"base64": "..."}``, since JSON has no bytes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Sequence
from typing import Any

from octaskly import errors

MAX_DELETED = 100_000
"""Most deleted task ids one change may carry (the primary deletes at most 1000 a
transaction)."""
MAX_ID_LENGTH = 256


@dataclasses.dataclass(frozen=True, slots=True)
class Position:
    """Where a database stands: its history (`db_id`), term and last transaction."""

    db_id: str
    term: int
    lsn: int


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One committed transaction of the primary, as full row images."""

    lsn: int
    term: int
    committed_at: float
    tasks: Sequence[Sequence[Any]] = ()
    tokens: Sequence[Sequence[Any]] = ()
    deleted: Sequence[str] = ()
    """Ids of the tasks this transaction deleted (retention)."""

    def size(self) -> int:
        """A rough byte count, for bounding the primary's buffer."""
        return (
            64
            + sum(_row_size(r) for r in self.tasks)
            + sum(_row_size(r) for r in self.tokens)
            + sum(len(i) + 8 for i in self.deleted)
        )

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "lsn": self.lsn,
            "term": self.term,
            "at": self.committed_at,
            "tasks": [_row_to_wire(r) for r in self.tasks],
            "tokens": [_row_to_wire(r) for r in self.tokens],
        }
        if self.deleted:  # optional: a primary from before retention never sends it
            wire["deleted"] = list(self.deleted)
        return wire

    @classmethod
    def from_wire(cls, raw: Any, *, task_width: int, token_width: int) -> Change:
        """Validate a change received from a primary; ProtocolError if it is malformed."""
        try:
            lsn, term, at = raw["lsn"], raw["term"], raw["at"]
            tasks, tokens = raw["tasks"], raw["tokens"]
            deleted = raw.get("deleted", [])
            if not (
                _is_int(lsn)
                and lsn >= 1
                and _is_int(term)
                and term >= 1
                and isinstance(at, int | float)
                and isinstance(tasks, list)
                and isinstance(tokens, list)
            ):
                raise TypeError("lsn, term, at, tasks, tokens")
            if not (
                isinstance(deleted, list)
                and len(deleted) <= MAX_DELETED
                and all(isinstance(i, str) and 0 < len(i) <= MAX_ID_LENGTH for i in deleted)
            ):
                raise TypeError(f"deleted: at most {MAX_DELETED} task ids")
            for rows, width in ((tasks, task_width), (tokens, token_width)):
                for row in rows:
                    if not isinstance(row, list) or len(row) != width:
                        raise TypeError(f"a row of {width} columns")
            tasks = [_row_from_wire(r) for r in tasks]
            tokens = [_row_from_wire(r) for r in tokens]
        except (KeyError, TypeError, AttributeError) as exc:
            raise errors.ProtocolError(f"invalid change: {exc}") from None
        return cls(lsn, term, float(at), tasks, tokens, deleted)


def _row_to_wire(row: Sequence[Any]) -> list[Any]:
    return [
        {"base64": base64.b64encode(v).decode("ascii")} if isinstance(v, bytes) else v for v in row
    ]


def _row_from_wire(row: list[Any]) -> list[Any]:
    values: list[Any] = []
    for value in row:
        if isinstance(value, dict):
            if set(value) != {"base64"} or not isinstance(value["base64"], str):
                raise TypeError('a bytes value is {"base64": "..."}')
            try:
                value = base64.b64decode(value["base64"], validate=True)
            except (binascii.Error, ValueError):
                raise TypeError("a bytes value that is not valid base64") from None
        elif not (value is None or isinstance(value, str | int | float)):
            raise TypeError("row values: text, numbers, bytes or null")
        values.append(value)
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _row_size(row: Sequence[Any]) -> int:
    return sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)


def on_history(history: Sequence[tuple[int, int]], term: int, lsn: int, last_lsn: int) -> bool:
    """Whether a database at (term, lsn) holds only transactions of this history.

    `history` is [(term, start_lsn)] ascending: term T's transactions are those after its
    start up to the next term's start (or `last_lsn` for the newest term).
    """
    for i, (t, _start) in enumerate(history):
        if t == term:
            end = history[i + 1][1] if i + 1 < len(history) else last_lsn
            return lsn <= end
    return False
