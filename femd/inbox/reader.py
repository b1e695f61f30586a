"""Reading an inbox: events, outputs, nodes, live logs and tasks, as records.

Owns the record types (``StoredEvent``, ``OutputStatus``, ``NodeSeen``,
``LogBatch``, ``TaskSummary``; ``EventGap`` is ``gaps``') and the queries
behind them, for everyone who reads: ``femd watch``, ``femd tasks
--orchestrator``, ``femd nodes``. Does not write (``femd.inbox.staging``
does).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

import msgspec

from femd.errors import StateError, cut
from femd.inbox.database import InboxDatabase
from femd.inbox.gaps import EventGap, open_gaps

__all__ = [
    "InboxReader",
    "LogBatch",
    "NodeSeen",
    "OutputStatus",
    "StoredEvent",
    "TaskSummary",
]


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


class StoredEvent(msgspec.Struct, frozen=True):
    """One status event as received; ``id`` orders the inbox."""

    id: int
    node: str
    task_id: str
    state: str
    body: dict[str, Any]


class OutputStatus(msgspec.Struct, frozen=True):
    """Where one task's outputs from one node stand."""

    node: str
    task_id: str
    status: str
    size: int
    chunks: int
    received: int
    path: str | None
    error: str | None


class NodeSeen(msgspec.Struct, frozen=True):
    """A node's latest status and when the inbox got it."""

    node: str
    body: dict[str, Any]
    seen_at: datetime


class LogBatch(msgspec.Struct, frozen=True):
    """Lines a running task printed (task output, never a femd record)."""

    id: int
    node: str
    task_id: str
    seq: int
    dropped: int
    text: str


class TaskSummary(msgspec.Struct, frozen=True):
    """A task on one node as the inbox knows it."""

    node: str
    task_id: str
    state: str
    at: str
    outputs: str | None


class InboxReader(InboxDatabase):
    """The reads of one inbox directory (see ``InboxDatabase``)."""

    def submitted(self, task_id: str) -> tuple[str, list[str]] | None:
        """(project, nodes) of a task submitted from here, or None."""
        rows = self.query(
            "SELECT project, nodes FROM submitted WHERE task_id = ?", (task_id,)
        )
        return None if not rows else (rows[0][0], json.loads(rows[0][1]))

    def _since(self, what: str, task_id: str | None, after: int) -> list[Any]:
        """``SELECT what`` rows with ``id > after`` (of one task), in id order."""
        if task_id is None:
            return self.query(f"SELECT {what} WHERE id > ? ORDER BY id", (after,))
        return self.query(
            f"SELECT {what} WHERE id > ? AND task_id = ? ORDER BY id",
            (after, task_id),
        )

    def last_ids(self) -> tuple[int, int]:
        """The newest (event, log batch) inbox ids, 0 when there is none."""
        rows = self.query(
            "SELECT (SELECT COALESCE(MAX(id), 0) FROM events),"
            " (SELECT COALESCE(MAX(id), 0) FROM logs)"
        )
        return int(rows[0][0]), int(rows[0][1])

    def events(self, task_id: str | None = None, after: int = 0) -> list[StoredEvent]:
        """Status events after inbox id *after*, of one task or all, in order."""
        rows = self._since("id, node, task_id, state, body FROM events", task_id, after)
        return [StoredEvent(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def gaps(self) -> list[EventGap]:
        """Status events missing between ones received, per node (``gaps``).

        Raises:
            StateError: the read failed.
        """
        with self._lock:
            try:
                return open_gaps(self._db)
            except sqlite3.Error as e:
                raise StateError(f"inbox: read failed: {cut(e)}") from e

    def output(self, node: str, task_id: str) -> OutputStatus | None:
        """Where the outputs of *task_id* from *node* stand, or None if unknown."""
        rows = self.query(
            "SELECT status, size, chunks, error, (SELECT COUNT(*) FROM chunks c"
            " WHERE c.node = o.node AND c.task_id = o.task_id) FROM outputs o"
            " WHERE node = ? AND task_id = ?",
            (node, task_id),
        )
        if not rows:
            return None
        status, size, chunks, error, got = rows[0]
        path = None
        if status == "complete":
            path = str(self.root / node / task_id)
            got = chunks
        return OutputStatus(node, task_id, status, size, chunks, got, path, error)

    def nodes(self) -> list[NodeSeen]:
        """Every node that ever sent its status, by name."""
        rows = self.query("SELECT node, body, seen_at FROM nodes ORDER BY node")
        return [NodeSeen(n, json.loads(b), _parse_time(at)) for n, b, at in rows]

    def logs(self, task_id: str | None = None, after: int = 0) -> list[LogBatch]:
        """Live log batches after inbox id *after*, in order of arrival."""
        rows = self._since(
            "id, node, task_id, seq, dropped, body FROM logs", task_id, after
        )
        return [
            LogBatch(
                r[0], r[1], r[2], r[3], r[4], bytes(r[5]).decode("utf-8", "replace")
            )
            for r in rows
        ]

    def tasks(self) -> list[TaskSummary]:
        """The latest state of every task on every node, newest first."""
        rows = self.query(
            "SELECT e.node, e.task_id, e.state, json_extract(e.body, '$.at'),"
            " o.status FROM events e LEFT JOIN outputs o"
            " ON o.node = e.node AND o.task_id = e.task_id"
            " WHERE e.id = (SELECT MAX(id) FROM events x"
            " WHERE x.node = e.node AND x.task_id = e.task_id)"
            " ORDER BY e.id DESC"
        )
        return [TaskSummary(n, t, s, str(at or ""), o) for n, t, s, at, o in rows]
