"""The node's sqlite database: opening it, its schema, its transactions.

Owns the connection to ``state_dir/state.sqlite``: creating it private, WAL
mode with ``synchronous=FULL`` (what a method returned is on disk: the agent
acks a delivery only after the commit, DESIGN "Broker topology"), the schema
and its migrations, the marker beside it (``statemark``), and the one-writer
lock with its short ``BEGIN IMMEDIATE`` transactions. ``Outbox`` and
``State`` build on it; nothing else speaks SQL to the state. Holds no task or
message logic.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from femd import statemark
from femd.errors import StateError, cut
from femd.sqltx import immediate, while_busy

__all__ = ["SCHEMA_VERSION", "Database", "parse_time", "time_text"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 3
_BUSY_MS: Final = 5000


_SCHEMA: Final = """
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    decision TEXT CHECK (decision IN ('allow', 'deny')),
    reasons TEXT NOT NULL DEFAULT '[]',
    manifest_sha256 TEXT NOT NULL,
    payload BLOB,
    signer_keyids TEXT NOT NULL DEFAULT '[]',
    launcher TEXT,
    received_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    exit_code INTEGER,
    output_sha256 TEXT,
    output_bytes INTEGER,
    output_chunks INTEGER,
    error TEXT,
    usage TEXT
);
CREATE INDEX tasks_received ON tasks (received_at);
CREATE TABLE transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL REFERENCES tasks (task_id),
    state TEXT NOT NULL,
    at TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX transitions_task ON transitions (task_id, id);
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    headers TEXT,
    body BLOB NOT NULL,
    created_at TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0 CHECK (published IN (0, 1))
);
CREATE INDEX outbox_pending ON outbox (published, seq);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('event_seq', 0);
"""

# The statements that bring schema n to n + 1.
_MIGRATE: Final = {
    # What each task used (JSON; `usage` of the terminal event).
    1: ("ALTER TABLE tasks ADD COLUMN usage TEXT",),
    # Schema 2 -> 3: status events count on their own (`event_seq`); the
    # count starts at the first event after the upgrade.
    2: (
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO counters (name, value) VALUES ('event_seq', 0)",
    ),
}


def time_text(at: datetime) -> str:
    """Return *at* as fixed-width RFC 3339 UTC text (sorts as it compares)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("state: times must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Read back what ``time_text`` wrote."""
    return datetime.fromisoformat(text).astimezone(UTC)


class Database:
    """The state database's connection; safe for one writer thread plus readers.

    Args:
        path: the database file, normally ``StateDir.db``.

    Raises:
        StateError: the file cannot be opened or created, is not a femd state
            database, or has an unsupported schema version.
    """

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) the database and bring its schema up."""
        self._path = path
        self._lock = threading.Lock()
        try:
            if path.stat().st_size == 0:
                statemark.check(path, "empty")
        except FileNotFoundError:
            statemark.check(path, "missing")
        except OSError as e:
            raise StateError(f"state: cannot open {cut(path)}: {e.strerror}") from e
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The state holds manifests: create it private; sqlite gives its
            # -wal and -shm files the same mode.
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            os.close(fd)
        except OSError as e:
            raise StateError(f"state: cannot open {cut(path)}: {e.strerror}") from e
        try:
            self._db = sqlite3.connect(
                path,
                timeout=_BUSY_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise StateError(f"state: cannot open {cut(path)}: {cut(e)}") from e
        try:
            while_busy(self._setup, _BUSY_MS / 1000)
        except sqlite3.Error as e:
            self._db.close()
            raise StateError(f"state: cannot open {cut(path)}: {cut(e)}") from e
        except StateError:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        db.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
        # Takes effect only on a database without tables yet: prune() can
        # then give freed pages back (an older database keeps its size).
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateError(
                f"state: cannot use WAL journal on {cut(self._path)} (got {mode})"
            )
        # DESIGN "Broker topology": an ack follows a commit, so commits must be
        # durable, not just atomic.
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            if not statemark.marker_path(self._path).exists():
                self._mark("a database created before markers")
            return
        with immediate(db):
            # Another process may have created the schema while we waited.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # SECURITY: an empty database where one existed is a lost one,
                # never a new one (replay protection).
                statemark.check(self._path, "empty")
                # Not executescript(): it would COMMIT the open transaction first.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                logger.info(
                    "state: created schema %d in %s", SCHEMA_VERSION, self._path
                )
            elif version in _MIGRATE:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATE[step]:
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                logger.info(
                    "state: schema %d -> %d in %s", version, SCHEMA_VERSION, self._path
                )
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"state: unsupported schema version in {cut(self._path)}"
                    f" (got {version}, expected {SCHEMA_VERSION})"
                )
        statemark.write(self._path)

    def _mark(self, what: str) -> None:
        """Write the marker of an existing database; a reader may not be able to."""
        try:
            statemark.write(self._path)
        except StateError as e:
            logger.warning("state: %s has no marker yet: %s", what, e)

    def close(self) -> None:
        """Close the database; later calls raise ``StateError``.

        Raises:
            StateError: sqlite failed while closing.
        """
        with self._lock, self._guard("close"):
            self._db.close()

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StateError(f"state: {what} failed: {cut(e)}") from e

    @contextmanager
    def _write(
        self, what: str, *, durable: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One short write transaction under the lock; rolled back on any error.

        A write that is not *durable* commits without its own fsync
        (``synchronous=NORMAL`` for that commit: WAL keeps it atomic, and the
        next durable commit's fsync covers it). Only for a change whose loss
        in a power cut costs a repeat and breaks no promise.
        """
        with self._lock, self._guard(what):
            if not durable:
                self._db.execute("PRAGMA synchronous = NORMAL")
            try:
                with immediate(self._db) as db:
                    yield db
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._guard(what):
            yield self._db
