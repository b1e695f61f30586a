"""The inbox database, ``inbox.sqlite``: its schema, opening it, its transactions.

Owns the tables (events, outputs and their chunks, nodes, live logs,
submitted tasks; those of lost events come from ``gaps``), the WAL and
busy-wait settings shared by every receiver and reader, and the one place
sqlite errors become ``StateError``. Does not know what the rows mean
(``femd.inbox.reader`` and ``femd.inbox.staging``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from femd.assembly import release_dead_claims
from femd.errors import StateError, cut
from femd.inbox import gaps
from femd.sqltx import immediate, while_busy

__all__ = ["SCHEMA_VERSION", "InboxDatabase"]

SCHEMA_VERSION: Final = 3
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
    at TEXT NOT NULL,
    UNIQUE (node, seq, at)
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


# Schema 2 -> 3: an event is one per (node, seq, at), no longer (node, seq):
# a node whose state database is new numbers from 1 again, and its events
# were dropped as duplicates of the old ones. A redelivery repeats `at`; two
# lives of a node do not meet at the same seq and microsecond.
_EVENTS_BY_TIME: Final = (
    "ALTER TABLE events RENAME TO events_v2",
    _SCHEMA[_SCHEMA.index("CREATE TABLE events") : _SCHEMA.index("CREATE INDEX")],
    "INSERT INTO events (id, node, seq, task_id, state, body, received_at,"
    " event_seq, at) SELECT id, node, seq, task_id, state, body, received_at,"
    " event_seq, COALESCE(json_extract(body, '$.at'), '') FROM events_v2",
    "DROP TABLE events_v2",
    "CREATE INDEX events_task ON events (task_id, id)",
)


class InboxDatabase:
    """The database of one inbox directory; safe for one thread per instance.

    Args:
        root: the directory (created 0700).

    Raises:
        StateError: the database cannot be opened.
    """

    def __init__(self, root: Path) -> None:
        """Open (creating if needed) ``inbox.sqlite`` in *root*."""
        self.root = root
        self._lock = threading.Lock()
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._db = sqlite3.connect(
                root / "inbox.sqlite",
                timeout=_BUSY_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            while_busy(self._setup, _BUSY_MS / 1000)
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"inbox: cannot open {cut(root)}: {cut(e)}") from e

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        with immediate(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                for statement in gaps.SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version in (1, 2):
                if version == 1:
                    # Events numbered by their node (`event_seq`), the holes.
                    db.execute("ALTER TABLE events ADD COLUMN event_seq INTEGER")
                    for statement in gaps.SCHEMA:
                        db.execute(statement)
                for statement in _EVENTS_BY_TIME:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"inbox: unsupported schema version in {cut(self.root)}"
                    f" (got {version}, expected {SCHEMA_VERSION})"
                )
            release_dead_claims(db)

    def close(self) -> None:
        """Close the database."""
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
                with immediate(self._db) as db:
                    yield db
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
