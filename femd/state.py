"""Durable node state: tasks, their transitions and the outbox.

Owns ``state_dir/state.sqlite`` and is the only module that speaks SQL. Every
write is one short ``BEGIN IMMEDIATE`` transaction in WAL mode with
``synchronous=FULL``, so what a method returned is on disk: the agent acks a
delivery only after ``record()`` returned (DESIGN "Broker topology"). Status
events are written to the outbox in the same transaction as the task change they
describe; the packed outputs' chunks go through the same outbox, so that
nothing is lost while the broker is away. The broker module publishes them in
``seq`` order and calls ``mark_published``.

One writer (the agent's main thread) and any number of readers (``femd tasks``
in another process) may use the file at once. Does not decide, publish, audit
or run anything.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import msgspec

from femd import statemark
from femd.errors import StageOutError, StateError, cut, printable
from femd.stageout import CHUNK_BYTES, chunk_count

__all__ = [
    "EVENTS_EXCHANGE",
    "RESULTS_EXCHANGE",
    "STATES",
    "TERMINAL_STATES",
    "OutboxEvent",
    "State",
    "TaskRow",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
# DESIGN "Broker topology" exchanges.
EVENTS_EXCHANGE: Final = "femd.events"
RESULTS_EXCHANGE: Final = "femd.results"
_BUSY_MS: Final = 5000

TERMINAL_STATES: Final[frozenset[str]] = frozenset(
    {"rejected", "succeeded", "failed", "timed_out", "cancelled"}
)
# DESIGN "Broker topology" states, plus the node-local `queued`.
STATES: Final[frozenset[str]] = TERMINAL_STATES | {
    "received",
    "queued",
    "staging",
    "running",
    "uploading",
}

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
"""

_COLUMNS: Final = (
    "task_id, project, kind, state, decision, reasons, manifest_sha256, payload, "
    "signer_keyids, launcher, received_at, updated_at, exit_code, output_sha256, "
    "output_bytes, output_chunks, error, usage"
)
# Schema 1 -> 2: what each task used (JSON; `usage` of the terminal event).
_MIGRATE_1_2: Final = "ALTER TABLE tasks ADD COLUMN usage TEXT"
_INSERT_TRANSITION: Final = (
    "INSERT INTO transitions (task_id, state, at, detail) VALUES (?, ?, ?, ?)"
)


class TaskRow(msgspec.Struct, frozen=True):
    """One task as the node recorded it, with its latest state."""

    task_id: str
    project: str
    kind: str
    state: str
    decision: Literal["allow", "deny"] | None
    reasons: tuple[tuple[str, str], ...]
    manifest_sha256: str
    payload: bytes | None
    signer_keyids: tuple[str, ...]
    launcher: str | None
    received_at: datetime
    updated_at: datetime
    exit_code: int | None
    output_sha256: str | None
    output_bytes: int | None
    output_chunks: int | None
    error: str | None
    usage: dict[str, float] | None = None


class OutboxEvent(msgspec.Struct, frozen=True):
    """A message waiting to be published; ``seq`` is monotonic per node.

    A status event (exchange ``femd.events``, JSON body, no headers) or an
    output chunk (``femd.results``, archive bytes, headers ``index``,
    ``total``, ``sha256``).
    """

    seq: int
    routing_key: str
    body: bytes
    exchange: str = EVENTS_EXCHANGE
    headers: dict[str, object] | None = None


class _ReasonJson(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rule: str
    message: str


_decode_reasons = msgspec.json.Decoder(tuple[_ReasonJson, ...]).decode
_decode_keyids = msgspec.json.Decoder(tuple[str, ...]).decode
_decode_headers = msgspec.json.Decoder(dict[str, object]).decode
# Private keys of a result chunk's outbox headers: where its bytes are
# (`_file` is spelled out in mark_published's SQL).
_FILE: Final = "_file"
_LENGTH: Final = "_length"


def _read_chunk(head: dict[str, object]) -> tuple[dict[str, object], bytes] | None:
    """Read a queued chunk's bytes; return (public headers, bytes) or None if gone."""
    path, offset, length = head[_FILE], head.get("offset"), head.get(_LENGTH)
    if not (
        isinstance(path, str) and isinstance(offset, int) and isinstance(length, int)
    ):
        raise StateError("state: malformed result chunk row")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        logger.error("state: cannot read queued outputs %s: %s", path, e.strerror)
        return None
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        logger.error("state: queued outputs %s are shorter than queued", path)
        return None
    public = {k: v for k, v in head.items() if not k.startswith("_")}
    return public, data


def _time_text(at: datetime) -> str:
    """Return *at* as fixed-width RFC 3339 UTC text (sorts as it compares)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("state: times must be timezone-aware")
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _reasons_json(reasons: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    # Messages may quote file names or tool output that are not UTF-8.
    return [
        {"rule": printable(rule), "message": printable(message)}
        for rule, message in reasons
    ]


def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"state: unknown task state {state!r}")


class State:
    """The node's sqlite state; safe for one writer thread plus readers.

    Args:
        path: the database file, normally ``state_dir / "state.sqlite"``.

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
            self._setup()
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
        db.execute("BEGIN IMMEDIATE")
        try:
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
            elif version == 1:
                db.execute(_MIGRATE_1_2)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                logger.info("state: schema 1 -> %d in %s", SCHEMA_VERSION, self._path)
            elif version != SCHEMA_VERSION:
                raise StateError(
                    f"state: unsupported schema version in {cut(self._path)}"
                    f" (got {version}, expected {SCHEMA_VERSION})"
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
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
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One short write transaction under the lock; rolled back on any error."""
        with self._lock, self._guard(what):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._guard(what):
            yield self._db

    def _emit(
        self,
        db: sqlite3.Connection,
        *,
        task_id: str,
        state: str,
        node: str,
        at: str,
        fields: Mapping[str, object],
    ) -> int:
        """Insert one outbox event whose body carries its own ``seq``."""
        routing_key = f"{node}.{task_id}.{state}"
        cur = db.execute(
            "INSERT INTO outbox (exchange, routing_key, body, created_at)"
            " VALUES (?, ?, x'', ?)",
            (EVENTS_EXCHANGE, routing_key, at),
        )
        seq = cur.lastrowid
        if seq is None:
            raise RuntimeError("state: sqlite returned no outbox seq")
        body: dict[str, object] = {
            "node": node,
            "task_id": task_id,
            "state": state,
            "at": at,
            "seq": seq,
        }
        for key, value in fields.items():
            if key in body:
                raise ValueError(f"state: event field {key!r} is reserved")
            body[key] = value
        db.execute(
            "UPDATE outbox SET body = ? WHERE seq = ?", (msgspec.json.encode(body), seq)
        )
        return seq

    def record(
        self,
        *,
        task_id: str,
        project: str,
        kind: str,
        manifest_sha256: str,
        payload: bytes | None,
        signer_keyids: Sequence[str],
        launcher: str | None,
        decision: Literal["allow", "deny"],
        reasons: Sequence[tuple[str, str]],
        node: str,
        at: datetime,
    ) -> bool:
        """Record a newly received task and its decision, exactly once.

        In one transaction: the task row, its ``received`` then ``rejected``
        (deny) or ``queued`` (allow) transitions, and the outbox events
        ``received`` (and ``rejected`` with the reasons, for a deny).

        Returns:
            False, changing nothing, when *task_id* was already recorded
            (DESIGN "manifest": a replayed id never runs twice); else True.

        Raises:
            StateError: the database could not be written.
        """
        when = _time_text(at)
        state = "rejected" if decision == "deny" else "queued"
        with self._write("record") as db:
            cur = db.execute(
                f"INSERT INTO tasks ({_COLUMNS}) VALUES "  # noqa: S608 - constant
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "NULL, NULL, NULL, NULL, NULL, NULL) "
                "ON CONFLICT (task_id) DO NOTHING",
                (
                    task_id,
                    project,
                    kind,
                    state,
                    decision,
                    json.dumps(_reasons_json(reasons)),
                    manifest_sha256,
                    payload,
                    json.dumps(list(signer_keyids)),
                    launcher,
                    when,
                    when,
                ),
            )
            if cur.rowcount == 0:
                logger.info("state: task %s already recorded", task_id)
                return False
            detail = ",".join(rule for rule, _ in reasons)
            db.executemany(
                _INSERT_TRANSITION,
                [(task_id, "received", when, ""), (task_id, state, when, detail)],
            )
            self._emit(
                db, task_id=task_id, state="received", node=node, at=when, fields={}
            )
            if decision == "deny":
                self._emit(
                    db,
                    task_id=task_id,
                    state="rejected",
                    node=node,
                    at=when,
                    fields={"reasons": _reasons_json(reasons)},
                )
        return True

    def transition(
        self,
        task_id: str,
        state: str,
        *,
        node: str,
        at: datetime,
        exit_code: int | None = None,
        reasons: Sequence[tuple[str, str]] = (),
        outputs: tuple[str, int, int] | None = None,
        error: str | None = None,
        extra: Mapping[str, object] | None = None,
        usage: Mapping[str, float] | None = None,
    ) -> int:
        """Move a task to *state*, with its history row and status event.

        Args:
            task_id: a recorded task that is not in a terminal state.
            state: one of ``STATES``.
            node: this node's id (routing key and event body).
            at: when it happened (aware).
            exit_code: the workload's exit code, stored and sent when given.
            reasons: stored and sent as ``reasons`` when given.
            outputs: ``(sha256, bytes, chunks)`` of the packed outputs.
            error: our side's one-line failure text (stored, not sent).
            extra: more event fields (e.g. ``log_tail``); may not override any.
            usage: what the task used (cpu_s, memory_peak_bytes, pids_peak,
                output_bytes, wall_s), stored and sent as ``usage``.

        Returns:
            The outbox ``seq`` of the status event.

        Raises:
            StateError: unknown task, a terminal task, or the write failed.
        """
        _check_state(state)
        when = _time_text(at)
        fields: dict[str, object] = {}
        sets = ["state = ?", "updated_at = ?"]
        args: list[object] = [state, when]
        detail: list[str] = []
        if exit_code is not None:
            fields["exit_code"] = exit_code
            sets.append("exit_code = ?")
            args.append(exit_code)
            detail.append(f"exit_code={exit_code}")
        if reasons:
            fields["reasons"] = _reasons_json(reasons)
            sets.append("reasons = ?")
            args.append(json.dumps(fields["reasons"]))
            detail.append("rules=" + ",".join(rule for rule, _ in reasons))
        if outputs is not None:
            sha256, size, chunks = outputs
            fields["outputs"] = {"sha256": sha256, "bytes": size, "chunks": chunks}
            sets += ["output_sha256 = ?", "output_bytes = ?", "output_chunks = ?"]
            args += [sha256, size, chunks]
            detail.append(f"output_sha256={sha256}")
        if usage:
            fields["usage"] = dict(usage)
            sets.append("usage = ?")
            args.append(json.dumps(fields["usage"], sort_keys=True))
            detail.append("usage=" + json.dumps(fields["usage"], sort_keys=True))
        if error is not None:
            error = printable(error)
            sets.append("error = ?")
            args.append(error)
            detail.append(f"error={error}")
        fields.update(extra or {})
        with self._write("transition") as db:
            row = db.execute(
                "SELECT state FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise StateError(f"state: unknown task {cut(task_id)}")
            if row[0] in TERMINAL_STATES:
                raise StateError(
                    f"state: task {cut(task_id)} is already {row[0]}"
                    f" (cannot become {state})"
                )
            db.execute(
                f"UPDATE tasks SET {', '.join(sets)} WHERE task_id = ?",  # noqa: S608
                (*args, task_id),
            )
            db.execute(
                _INSERT_TRANSITION,
                (task_id, state, when, "; ".join(detail)),
            )
            seq = self._emit(
                db, task_id=task_id, state=state, node=node, at=when, fields=fields
            )
        logger.info("state: task %s -> %s (seq %d)", task_id, state, seq)
        return seq

    def event_only(
        self,
        *,
        task_id: str,
        state: str,
        node: str,
        at: datetime,
        reasons: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Queue a status event without touching any task row.

        Answers a replayed id (``rejected``) or an envelope whose id could not
        be read (*task_id* ``"unknown"``).

        Returns:
            The outbox ``seq`` of the event.

        Raises:
            StateError: the write failed.
        """
        _check_state(state)
        when = _time_text(at)
        fields: dict[str, object] = (
            {"reasons": _reasons_json(reasons)} if reasons else {}
        )
        with self._write("event") as db:
            return self._emit(
                db, task_id=task_id, state=state, node=node, at=when, fields=fields
            )

    def get(self, task_id: str) -> TaskRow | None:
        """Return the task recorded under *task_id*, or None.

        Raises:
            StateError: the read failed or a row is malformed.
        """
        with self._read("get") as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?",  # noqa: S608
                (task_id,),
            ).fetchone()
        return None if row is None else _task_row(row)

    def unfinished(self) -> list[TaskRow]:
        """Return every task not in a terminal state, oldest first.

        Raises:
            StateError: the read failed or a row is malformed.
        """
        marks = ", ".join("?" for _ in TERMINAL_STATES)
        with self._read("unfinished") as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state NOT IN ({marks}) "  # noqa: S608
                "ORDER BY received_at, rowid",
                sorted(TERMINAL_STATES),
            ).fetchall()
        return [_task_row(row) for row in rows]

    def history(self, limit: int | None = None) -> list[TaskRow]:
        """Return recorded tasks, newest first, at most *limit* of them.

        Raises:
            StateError: the read failed or a row is malformed.
        """
        with self._read("history") as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM tasks "  # noqa: S608
                "ORDER BY received_at DESC, rowid DESC LIMIT ?",
                (-1 if limit is None else max(limit, 0),),
            ).fetchall()
        return [_task_row(row) for row in rows]

    def transitions(self, task_id: str) -> list[tuple[str, datetime, str]]:
        """Return ``(state, at, detail)`` for every transition of a task, in order.

        Raises:
            StateError: the read failed.
        """
        with self._read("transitions") as db:
            rows = db.execute(
                "SELECT state, at, detail FROM transitions "
                "WHERE task_id = ? ORDER BY id",
                (task_id,),
            ).fetchall()
        return [(state, _parse_time(at), detail) for state, at, detail in rows]

    def pending_events(self, limit: int = 100) -> list[OutboxEvent]:
        """Return unpublished messages in ``seq`` order, at most *limit*.

        A result chunk's bytes are read here from its archive file; a chunk
        whose archive is gone is dropped with an error line (the orchestrator
        then never completes those outputs and says so).

        Raises:
            StateError: the read failed or a row is malformed.
        """
        with self._read("pending events") as db:
            rows = db.execute(
                "SELECT seq, routing_key, body, exchange, headers FROM outbox "
                "WHERE published = 0 ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        out: list[OutboxEvent] = []
        lost: list[int] = []
        for seq, key, body, exchange, headers in rows:
            try:
                head = None if headers is None else _decode_headers(headers)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise StateError(f"state: malformed outbox row: {cut(e)}") from e
            data = bytes(body)
            if head is not None and _FILE in head:
                chunk = _read_chunk(head)
                if chunk is None:
                    lost.append(seq)
                    continue
                head, data = chunk
            out.append(OutboxEvent(seq, key, data, exchange, head))
        if lost:
            logger.error(
                "state: %d result chunks lost (their archive is gone)", len(lost)
            )
            self.mark_published(lost)
        return out

    def enqueue_results(
        self,
        *,
        task_id: str,
        node: str,
        archive: Path,
        sha256: str,
        chunk_bytes: int = CHUNK_BYTES,
        at: datetime | None = None,
    ) -> int:
        """Queue the packed outputs as chunks for ``femd.results``, in one transaction.

        Each chunk is routed ``<node>.<task_id>`` with headers ``index``,
        ``total``, ``offset``, ``size`` (of the whole archive) and ``sha256``
        (of the whole archive). The rows hold no bytes: the archive stays a
        file (owned by femd, removed once its last chunk is confirmed) and
        ``pending_events`` reads each chunk from it, so a large output never
        sits in sqlite nor in memory. Queue them before the terminal status
        event that announces ``outputs``.

        Returns:
            The number of chunks (``chunk_count`` of the archive size).

        Raises:
            StageOutError: the archive cannot be read.
            StateError: the write failed.
        """
        when = _time_text(at or datetime.now(UTC))
        routing_key = f"{node}.{task_id}"
        try:
            size = archive.stat().st_size
            total = chunk_count(size, chunk_bytes)
        except OSError as e:
            raise StageOutError(f"outputs: cannot read {cut(archive)}: {cut(e)}") from e
        rows = []
        for index in range(total):
            offset = index * chunk_bytes
            headers = {
                "index": index,
                "total": total,
                "offset": offset,
                "size": size,
                "sha256": sha256,
                _FILE: str(archive),
                _LENGTH: min(chunk_bytes, size - offset),
            }
            rows.append((RESULTS_EXCHANGE, routing_key, json.dumps(headers), when))
        with self._write("enqueue results") as db:
            db.executemany(
                "INSERT INTO outbox (exchange, routing_key, headers, body,"
                " created_at) VALUES (?, ?, ?, x'', ?)",
                rows,
            )
        logger.info("state: queued %d result chunks of task %s", total, task_id)
        return total

    def mark_published(self, seqs: Iterable[int]) -> None:
        """Mark messages as confirmed by the broker.

        Status events stay (small, published); output chunks are deleted, and
        an archive whose last chunk is confirmed is removed, so the outputs do
        not live on at the node.

        Raises:
            StateError: the write failed.
        """
        batch = [(seq,) for seq in seqs]
        if not batch:
            return
        with self._write("mark published") as db:
            db.executemany("UPDATE outbox SET published = 1 WHERE seq = ?", batch)
            files = {
                str(f)
                for (f,) in db.execute(
                    "SELECT DISTINCT json_extract(headers, '$._file')"
                    " FROM outbox WHERE published = 1 AND exchange = ?",
                    (RESULTS_EXCHANGE,),
                )
                if f is not None
            }
            db.execute(
                "DELETE FROM outbox WHERE published = 1 AND exchange = ?",
                (RESULTS_EXCHANGE,),
            )
            done = [
                f
                for f in files
                if db.execute(
                    "SELECT 1 FROM outbox WHERE exchange = ? AND"
                    " json_extract(headers, '$._file') = ? LIMIT 1",
                    (RESULTS_EXCHANGE, f),
                ).fetchone()
                is None
            ]
        for f in done:
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("state: cannot remove sent archive %s: %s", f, e)

    def prune(self, before: datetime) -> tuple[int, int]:
        """Forget what neither replay protection nor the audit needs any more.

        Deletes published outbox messages created before *before* and clears
        the payload of tasks that ended before it. Every task row stays, with
        its id, decision, reasons, signer keyids and hashes (a replayed id is
        refused forever), and so do the transitions. Then gives the freed
        pages back to the file system.

        Returns:
            (outbox messages deleted, task payloads cleared).

        Raises:
            StateError: the write failed.
        """
        when = _time_text(before)
        marks = ", ".join("?" for _ in TERMINAL_STATES)
        with self._write("prune") as db:
            events = db.execute(
                "DELETE FROM outbox WHERE published = 1 AND created_at < ?", (when,)
            ).rowcount
            payloads = db.execute(
                "UPDATE tasks SET payload = NULL WHERE payload IS NOT NULL"  # noqa: S608
                f" AND updated_at < ? AND state IN ({marks})",
                (when, *sorted(TERMINAL_STATES)),
            ).rowcount
        if events or payloads:
            with self._lock, self._guard("prune"):
                # executescript() steps the pragma to its end (execute() frees
                # one page); no transaction is open here.
                self._db.executescript("PRAGMA incremental_vacuum;")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return events, payloads

    def queued_archives(self) -> set[str]:
        """Paths of the archives that still have result chunks to publish.

        Raises:
            StateError: the read failed.
        """
        with self._read("queued archives") as db:
            rows = db.execute(
                "SELECT DISTINCT json_extract(headers, '$._file') FROM outbox"
                " WHERE exchange = ? AND published = 0",
                (RESULTS_EXCHANGE,),
            ).fetchall()
        return {str(f) for (f,) in rows if f is not None}

    def counts(self) -> dict[str, int]:
        """Return the number of tasks in each state (for sd_notify ``STATUS=``).

        Raises:
            StateError: the read failed.
        """
        with self._read("counts") as db:
            rows = db.execute(
                "SELECT state, COUNT(*) FROM tasks GROUP BY state"
            ).fetchall()
        return {state: count for state, count in rows}


def _task_row(row: tuple[object, ...]) -> TaskRow:
    """Convert one ``_COLUMNS`` row; a malformed row is a ``StateError``."""
    try:
        reasons = _decode_reasons(str(row[5]))
        keyids = _decode_keyids(str(row[8]))
        return msgspec.convert(
            {
                "task_id": row[0],
                "project": row[1],
                "kind": row[2],
                "state": row[3],
                "decision": row[4],
                "reasons": [(r.rule, r.message) for r in reasons],
                "manifest_sha256": row[6],
                "payload": row[7],
                "signer_keyids": keyids,
                "launcher": row[9],
                "received_at": _parse_time(str(row[10])),
                "updated_at": _parse_time(str(row[11])),
                "exit_code": row[12],
                "output_sha256": row[13],
                "output_bytes": row[14],
                "output_chunks": row[15],
                "error": row[16],
                "usage": json.loads(str(row[17])) if row[17] is not None else None,
            },
            TaskRow,
            strict=True,
        )
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError) as e:
        raise StateError(f"state: malformed task row {cut(row[0])}: {cut(e)}") from e
