"""What streaming replication moves: a database's position, and one committed change.

A primary numbers every write transaction that changed something (`lsn`, kept in the
database in the same transaction). With capture on, the writer reads back the full rows
that transaction touched, right after its commit and before the next one begins, so a
`Change` is exactly the transaction's effect. A standby applies changes in order, one
transaction each (several per commit when they queue up), and stores the primary's `lsn`
with them: its position then says precisely which of the primary's transactions it has.

Row images rather than statements: applying one is idempotent and needs no knowledge of
the compare-and-set logic that produced it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from octaskly import errors


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

    def size(self) -> int:
        """A rough byte count, for bounding the primary's buffer."""
        return 64 + sum(_row_size(r) for r in self.tasks) + sum(_row_size(r) for r in self.tokens)

    def to_wire(self) -> dict[str, Any]:
        return {
            "lsn": self.lsn,
            "term": self.term,
            "at": self.committed_at,
            "tasks": [list(r) for r in self.tasks],
            "tokens": [list(r) for r in self.tokens],
        }

    @classmethod
    def from_wire(cls, raw: Any, *, task_width: int, token_width: int) -> Change:
        """Validate a change received from a primary; ProtocolError if it is malformed."""
        try:
            lsn, term, at = raw["lsn"], raw["term"], raw["at"]
            tasks, tokens = raw["tasks"], raw["tokens"]
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
            for rows, width in ((tasks, task_width), (tokens, token_width)):
                for row in rows:
                    if not isinstance(row, list) or len(row) != width:
                        raise TypeError(f"a row of {width} columns")
                    if not all(v is None or isinstance(v, str | int | float) for v in row):
                        raise TypeError("row values: text, numbers or null")
        except (KeyError, TypeError) as exc:
            raise errors.ProtocolError(f"invalid change: {exc}") from None
        return cls(lsn, term, float(at), tasks, tokens)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _row_size(row: Sequence[Any]) -> int:
    return sum(len(v) if isinstance(v, str) else 8 for v in row)


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
