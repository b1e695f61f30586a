"""The outbox: messages committed with the change they tell, published later.

Owns the ``outbox`` table of the state database. Status events are written in
the same transaction as the task change they describe; the packed outputs'
chunks go through the same outbox (their bytes stay in the archive file), so
nothing is lost while the broker is away. The broker link publishes them in
``seq`` order and calls ``mark_published``. Does not decide what a task's
state is (``State`` does) nor publish anything.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec

from femd.errors import StageOutError, StateError, cut
from femd.events import EVENTS_EXCHANGE, RESULTS_EXCHANGE, StatusEvent
from femd.stageout import CHUNK_BYTES, chunk_count
from femd.statedb import Database, time_text

__all__ = ["Outbox", "OutboxEvent", "Results", "chunk_rows"]

logger = logging.getLogger(__name__)


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


class Results(msgspec.Struct, frozen=True):
    """A packed archive to queue as result chunks (``Outbox.enqueue_results``)."""

    archive: Path
    sha256: str
    chunk_bytes: int = CHUNK_BYTES


def chunk_rows(
    task_id: str, node: str, results: Results, when: str
) -> tuple[int, list[tuple[str, str, str, str]]]:
    """The archive's size and its chunks' outbox rows (``Outbox.enqueue_results``).

    Raises:
        StageOutError: the archive cannot be read.
    """
    routing_key = f"{node}.{task_id}"
    archive, chunk_bytes = results.archive, results.chunk_bytes
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
            "sha256": results.sha256,
            _FILE: str(archive),
            _LENGTH: min(chunk_bytes, size - offset),
        }
        rows.append((RESULTS_EXCHANGE, routing_key, json.dumps(headers), when))
    return size, rows


class Outbox(Database):
    """The state database's outbox (see the module); ``State`` adds the tasks."""

    def _emit(self, db: sqlite3.Connection, event: StatusEvent) -> int:
        """Queue *event* with its ``seq`` and ``event_seq`` filled in; return seq.

        ``seq`` is the outbox row's (shared with result chunks); ``event_seq``
        the next of the status events' own counter, in the same transaction,
        so the events on ``femd.events`` are numbered without a gap.
        """
        routing_key = f"{event.node}.{event.task_id}.{event.state}"
        cur = db.execute(
            "INSERT INTO outbox (exchange, routing_key, body, created_at)"
            " VALUES (?, ?, x'', ?)",
            (EVENTS_EXCHANGE, routing_key, event.at),
        )
        seq = cur.lastrowid
        if seq is None:
            raise RuntimeError("state: sqlite returned no outbox seq")
        (event_seq,) = db.execute(
            "UPDATE counters SET value = value + 1 WHERE name = 'event_seq'"
            " RETURNING value"
        ).fetchone()
        body = msgspec.structs.replace(event, seq=seq, event_seq=event_seq)
        db.execute(
            "UPDATE outbox SET body = ? WHERE seq = ?", (msgspec.json.encode(body), seq)
        )
        return seq

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
        results = Results(archive, sha256, chunk_bytes)
        when = time_text(at or datetime.now(UTC))
        _, rows = chunk_rows(task_id, node, results, when)
        with self._write("enqueue results") as db:
            self._queue_chunks(db, rows)
        logger.info("state: queued %d result chunks of task %s", len(rows), task_id)
        return len(rows)

    @staticmethod
    def _queue_chunks(
        db: sqlite3.Connection, rows: list[tuple[str, str, str, str]]
    ) -> None:
        db.executemany(
            "INSERT INTO outbox (exchange, routing_key, headers, body,"
            " created_at) VALUES (?, ?, ?, x'', ?)",
            rows,
        )

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
        # Marking status events needs no fsync of its own: lost in a power
        # cut, they are published again and receivers dedupe on (node, seq, at)
        # (DESIGN "Status event"). A batch with result chunks is durable: the
        # archive it completes is removed after the commit.
        with self._read("mark published") as db:
            marks = ",".join("?" * len(batch))
            chunks = db.execute(
                f"SELECT 1 FROM outbox WHERE exchange = ? AND seq IN ({marks})"  # noqa: S608
                " LIMIT 1",
                (RESULTS_EXCHANGE, *(seq for (seq,) in batch)),
            ).fetchone()
        with self._write("mark published", durable=chunks is not None) as db:
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
