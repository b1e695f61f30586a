"""Lost status events: the holes in each node's ``event_seq`` numbering.

A node numbers its status events 1, 2, 3, ... (``event_seq``, DESIGN "Status
event"), with no gap on ``femd.events``. Owns two tables of the inbox
database: ``event_marks`` (the highest number seen per node) and ``event_gaps``
(the numbers not received between two that were, with when the hole
opened). ``note()`` keeps them in the transaction that commits the events, at
a constant cost per event; a late event (the broker hands back what a
receiver did not ack, so order is not guaranteed) shrinks or splits its hole.
A hole that stays open past a grace period is a lost event: ``femd watch``
says so. A node whose numbering starts again (a new state database) starts
over here too. Does not read the events themselves.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Final

import msgspec

__all__ = ["SCHEMA", "EventGap", "note", "open_gaps"]

SCHEMA: Final = (
    "CREATE TABLE event_marks (node TEXT PRIMARY KEY, high INTEGER NOT NULL)",
    "CREATE TABLE event_gaps (node TEXT NOT NULL, first INTEGER NOT NULL,"
    " last INTEGER NOT NULL, opened_at TEXT NOT NULL, PRIMARY KEY (node, first))",
)


class EventGap(msgspec.Struct, frozen=True):
    """Status events ``first``..``last`` of *node* not received (yet)."""

    node: str
    first: int
    last: int
    opened_at: datetime

    def __str__(self) -> str:
        """E.g. ``node fdn-01: status events 7-9 missing``."""
        which = (
            f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}"
        )
        one = self.first == self.last
        return f"node {self.node}: status event{'' if one else 's'} {which} missing"


def note(db: sqlite3.Connection, node: str, event_seq: int, now: str) -> None:
    """Take event *event_seq* of *node* into account (inside the caller's commit).

    A number above the highest one opens a hole below it (if it skipped
    any); one at or below it fills its place in a hole, or is a duplicate.
    """
    row = db.execute("SELECT high FROM event_marks WHERE node = ?", (node,)).fetchone()
    if row is None or (event_seq == 1 and row[0] > 1 and not _in_gap(db, node, 1)):
        # First sight of this node, or its numbering started again.
        if row is not None:
            db.execute("DELETE FROM event_gaps WHERE node = ?", (node,))
        db.execute(
            "INSERT OR REPLACE INTO event_marks (node, high) VALUES (?, ?)",
            (node, event_seq),
        )
        return
    high = int(row[0])
    if event_seq > high:
        if event_seq > high + 1:
            db.execute(
                "INSERT INTO event_gaps (node, first, last, opened_at)"
                " VALUES (?, ?, ?, ?)",
                (node, high + 1, event_seq - 1, now),
            )
        db.execute("UPDATE event_marks SET high = ? WHERE node = ?", (event_seq, node))
        return
    gap = db.execute(
        "SELECT first, last, opened_at FROM event_gaps"
        " WHERE node = ? AND first <= ? AND last >= ?",
        (node, event_seq, event_seq),
    ).fetchone()
    if gap is None:
        return  # a duplicate
    first, last, opened = gap
    db.execute("DELETE FROM event_gaps WHERE node = ? AND first = ?", (node, first))
    parts = [(first, event_seq - 1), (event_seq + 1, last)]
    db.executemany(
        "INSERT INTO event_gaps (node, first, last, opened_at) VALUES (?, ?, ?, ?)",
        [(node, a, b, opened) for a, b in parts if a <= b],
    )


def _in_gap(db: sqlite3.Connection, node: str, event_seq: int) -> bool:
    return (
        db.execute(
            "SELECT 1 FROM event_gaps WHERE node = ? AND first <= ? AND last >= ?",
            (node, event_seq, event_seq),
        ).fetchone()
        is not None
    )


def open_gaps(db: sqlite3.Connection) -> list[EventGap]:
    """Every hole still open, by node and number."""
    rows = db.execute(
        "SELECT node, first, last, opened_at FROM event_gaps ORDER BY node, first"
    ).fetchall()
    return [
        EventGap(node, first, last, datetime.fromisoformat(at))
        for node, first, last, at in rows
    ]
