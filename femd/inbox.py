"""The orchestrator's durable inbox: everything its identity receives, on disk.

Owns one directory (``results_dir`` of the orchestrator config, ``--inbox``):

- ``inbox.sqlite`` (WAL): status events (one per node and ``seq``) and the
  holes in each node's ``event_seq`` numbering (``eventgaps``), the
  announced outputs and which of their chunks are in, node status, live log
  batches, and the tasks this orchestrator submitted;
- ``parts/<node>/<task>.part``: outputs being received, each chunk written at
  its offset as it comes (memory stays at one chunk whatever the size);
- ``<node>/<task>.tar.gz`` and ``<node>/<task>/``: verified (sha256 of the
  whole) and safely unpacked outputs;
- ``events.jsonl``: every status event once, one JSON object a line.

What a receiver took from the broker is ``stage()``d, then ``commit()``ted
(file data fsynced, rows in one transaction) and only then acked, so a killed
receiver loses nothing: the broker redelivers and duplicates are ignored. Any
number of receivers (processes) may share the directory; whoever commits the
last chunk of an output verifies and unpacks it. Reading is for everyone:
``femd watch``, ``femd tasks --orchestrator``, ``femd nodes``. Does not talk
to the broker (``femd.client`` does) nor decide anything.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec

from femd import eventgaps
from femd.assembly import OutputAssembly, now_text, release_dead_claims
from femd.errors import StateError, cut
from femd.eventgaps import EventGap
from femd.events import TERMINAL_STATES

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "EventGap",
    "Inbox",
    "LogBatch",
    "NodeSeen",
    "OutputStatus",
    "StoredEvent",
    "TaskSummary",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
# Above any node's default cap (2 GiB of content plus archive slack).
DEFAULT_MAX_OUTPUT_BYTES: Final = 4 * 1024 * 1024 * 1024
_BUSY_MS: Final = 30000

_SCHEMA: Final = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL,
    received_at TEXT NOT NULL,
    event_seq INTEGER,
    UNIQUE (node, seq)
);
CREATE INDEX events_task ON events (task_id, id);
CREATE TABLE outputs (
    node TEXT NOT NULL,
    task_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('receiving', 'verifying', 'complete', 'failed')),
    claimed_by INTEGER,
    error TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (node, task_id)
);
CREATE TABLE chunks (
    node TEXT NOT NULL,
    task_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (node, task_id, idx)
);
CREATE TABLE nodes (
    node TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
CREATE TABLE logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (node, task_id, seq)
);
CREATE INDEX logs_task ON logs (task_id, id);
CREATE TABLE submitted (
    task_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    project TEXT NOT NULL,
    nodes TEXT NOT NULL,
    submitted_at TEXT NOT NULL
);
"""


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# The shapes of femd.model.Name and TaskId: safe as path parts.
_NODE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TASK: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _split_key(routing_key: str) -> tuple[str, str] | None:
    """``<node>.<task id>`` (task ids have no dots), or None if malformed."""
    node, _, task = routing_key.rpartition(".")
    if _NODE.fullmatch(node) and _TASK.fullmatch(task):
        return node, task
    return None


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


class _Decoded(msgspec.Struct, frozen=True):
    node: str
    task_id: str
    state: str
    seq: int
    event_seq: int | None = None


_decode_event = msgspec.json.Decoder(_Decoded).decode


class Inbox:
    """One orchestrator inbox directory; safe for one thread per instance.

    Args:
        root: the directory (created 0700).
        max_output_bytes: the largest archive (and unpacked content) accepted.

    Raises:
        StateError: the database cannot be opened.
    """

    def __init__(
        self, root: Path, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    ) -> None:
        """Open (creating if needed) the inbox at *root*."""
        self.root = root
        self.max_output_bytes = max_output_bytes
        self._lock = threading.Lock()
        self._events: list[tuple[str, int, str, str, str, int | None]] = []
        self._nodes: dict[str, str] = {}
        self._logs: list[tuple[str, str, int, int, bytes]] = []
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(
                root / "inbox.sqlite",
                timeout=_BUSY_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            self._setup()
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"inbox: cannot open {cut(root)}: {cut(e)}") from e
        self.assembly = OutputAssembly(self, root, max_output_bytes)

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                for statement in eventgaps.SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 1:
                # Events numbered by their node (`event_seq`), and the holes.
                db.execute("ALTER TABLE events ADD COLUMN event_seq INTEGER")
                for statement in eventgaps.SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"inbox: unsupported schema version in {cut(self.root)}"
                    f" (got {version}, expected {SCHEMA_VERSION})"
                )
            release_dead_claims(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close open part files and the database."""
        self.assembly.close()
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, rolled back on any error.

        Raises:
            StateError: sqlite failed.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StateError(f"inbox: {what} failed: {cut(e)}") from e

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """The rows of one read.

        Raises:
            StateError: sqlite failed.
        """
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StateError(f"inbox: read failed: {cut(e)}") from e

    # -- staging what a receiver took from the broker ---------------------------

    def stage_event(self, routing_key: str, body: bytes) -> None:
        """Keep a status event for ``commit()``; a malformed one is logged, dropped."""
        try:
            ev = _decode_event(body)
            parsed = json.loads(body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            logger.warning("inbox: dropping a malformed status event: %s", cut(e))
            return
        # SECURITY: the broker lets a node publish only under its own name
        # (topic permissions); the body must not speak for another node.
        if not isinstance(parsed, dict) or routing_key.rsplit(".", 2)[0] != ev.node:
            logger.warning("inbox: dropping an event routed %s", cut(routing_key))
            return
        text = json.dumps(parsed, sort_keys=True)
        self._events.append((ev.node, ev.seq, ev.task_id, ev.state, text, ev.event_seq))

    def stage_node(self, routing_key: str, body: bytes) -> None:
        """Keep a node status for ``commit()`` (the newest per node wins)."""
        try:
            parsed = json.loads(body)
            node = str(parsed["node"])
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("inbox: dropping a malformed node status: %s", cut(e))
            return
        # SECURITY: as for events, a node speaks only for itself.
        if not _NODE.fullmatch(node) or routing_key != f"{node}.status":
            logger.warning("inbox: dropping a node status routed %s", cut(routing_key))
            return
        self._nodes[node] = json.dumps(parsed, sort_keys=True)

    def stage_log(
        self, routing_key: str, headers: Mapping[str, Any], body: bytes
    ) -> None:
        """Keep a live log batch for ``commit()``."""
        key = _split_key(routing_key)
        try:
            seq = int(headers["seq"])
            dropped = int(headers.get("dropped", 0))
        except (KeyError, TypeError, ValueError):
            key = None
        if key is None:
            logger.warning(
                "inbox: dropping a malformed log batch (%s)", cut(routing_key)
            )
            return
        self._logs.append((*key, seq, dropped, body))

    # -- commit --------------------------------------------------------------------

    def commit(self) -> None:
        """Make everything staged durable: fsync part files, one transaction.

        Call before acking what was staged. Then verifies and unpacks every
        output whose last chunk this commit brought.

        Raises:
            StateError: the database failed (nothing staged may be acked).
            StageOutError: a part file cannot be synced.
        """
        if not (self._events or self.assembly.staged or self._nodes or self._logs):
            return
        touched = self.assembly.sync()
        now = now_text()
        announced: list[tuple[str, str, dict[str, Any]]] = []
        fresh: list[str] = []
        with self.transaction("commit") as db:
            for node, seq, task, state, text, event_seq in self._events:
                if db.execute(
                    "INSERT OR IGNORE INTO events (node, seq, task_id, state, body,"
                    " received_at, event_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (node, seq, task, state, text, now, event_seq),
                ).rowcount:
                    fresh.append(text)
                    if event_seq is not None:
                        eventgaps.note(db, node, event_seq, now)
                outputs = json.loads(text).get("outputs")
                if state in TERMINAL_STATES and isinstance(outputs, dict):
                    announced.append((node, task, outputs))
            self.assembly.record(db)
            db.executemany(
                "INSERT INTO nodes (node, body, seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (node) DO UPDATE SET body = excluded.body,"
                " seen_at = excluded.seen_at",
                [(n, b, now) for n, b in self._nodes.items()],
            )
            db.executemany(
                "INSERT OR IGNORE INTO logs (node, task_id, seq, dropped, body,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in self._logs],
            )
        if fresh:
            # A plain log of every event, for tools that read files (jq, FEM).
            with (self.root / "events.jsonl").open("a") as f:
                f.write("".join(line + "\n" for line in fresh))
        self._events.clear()
        self._nodes.clear()
        self._logs.clear()
        for node, task, outputs in announced:
            self.assembly.check_announcement(node, task, outputs)
        for node, task in touched:
            self.assembly.finish_if_complete(node, task)

    def stage_chunk(
        self, routing_key: str, headers: Mapping[str, Any], body: bytes
    ) -> bool:
        """Place a result chunk (see ``OutputAssembly.stage``); False: hand it back.

        Raises:
            StateError: the inbox database failed.
        """
        key = _split_key(routing_key)
        if key is None:
            logger.warning("inbox: dropping a chunk routed %s", cut(routing_key))
            return True
        return self.assembly.stage(*key, headers, body)

    # -- submitted tasks ----------------------------------------------------------

    def record_submitted(
        self, task_id: str, kind: str, project: str, nodes: list[str]
    ) -> None:
        """Remember a task this orchestrator submitted (for cancel and listings).

        Raises:
            StateError: the write failed.
        """
        with self.transaction("record submitted") as db:
            db.execute(
                "INSERT OR REPLACE INTO submitted (task_id, kind, project, nodes,"
                " submitted_at) VALUES (?, ?, ?, ?, ?)",
                (task_id, kind, project, json.dumps(nodes), now_text()),
            )

    def submitted(self, task_id: str) -> tuple[str, list[str]] | None:
        """(project, nodes) of a task submitted from here, or None."""
        rows = self.query(
            "SELECT project, nodes FROM submitted WHERE task_id = ?", (task_id,)
        )
        return None if not rows else (rows[0][0], json.loads(rows[0][1]))

    # -- reading -------------------------------------------------------------------

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
        """Status events missing between ones received, per node (see eventgaps).

        Raises:
            StateError: the read failed.
        """
        with self._lock:
            try:
                return eventgaps.open_gaps(self._db)
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
