"""Outputs arriving at the orchestrator's inbox: chunks to a file, then verified.

Owns ``parts/<node>/<task>.part`` of an inbox and the ``outputs``/``chunks``
rows: each chunk is written at its offset as it comes (``Reassembler``), its
row committed with the inbox's transaction; whoever commits an output's last
chunk claims it, checks the sha256 of the whole against the announcement and
unpacks it safely into ``<node>/<task>/``. A claim left by a dead receiver is
released when the inbox is opened again. Which messages arrive, and the
other tables, are the inbox's business.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from femd.errors import StageOutError, cut
from femd.stageout import Reassembler, unpack_outputs

__all__ = ["OutputAssembly", "Store", "now_text", "release_dead_claims"]

logger = logging.getLogger(__name__)


def now_text() -> str:
    """The current time as fixed-width RFC 3339 UTC text."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Store(Protocol):
    """The inbox database, as the assembly uses it."""

    def transaction(self, what: str) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction."""
        ...

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """Rows of one read."""
        ...


def release_dead_claims(db: sqlite3.Connection) -> None:
    """A receiver killed while verifying: whoever comes next does it."""
    for node, task, pid in db.execute(
        "SELECT node, task_id, claimed_by FROM outputs WHERE status = 'verifying'"
    ).fetchall():
        if not _alive(pid):
            db.execute(
                "UPDATE outputs SET status = 'receiving', claimed_by = NULL"
                " WHERE node = ? AND task_id = ?",
                (node, task),
            )


class OutputAssembly:
    """The outputs one receiver is filling in (part files it holds open).

    Args:
        store: the inbox database.
        root: the inbox directory.
        max_bytes: the largest archive (and unpacked content) accepted.
    """

    def __init__(self, store: Store, root: Path, max_bytes: int) -> None:
        """Hold nothing open yet."""
        self._store = store
        self.root = root
        self.max_bytes = max_bytes
        self.staged: set[tuple[str, str, int]] = set()
        self._parts: dict[tuple[str, str], Reassembler] = {}

    def close(self) -> None:
        """Close the part files (what was written stays)."""
        for part in self._parts.values():
            part.close()
        self._parts.clear()

    def sync(self) -> set[tuple[str, str]]:
        """Fsync the part files staged chunks went to; return those outputs.

        Raises:
            StageOutError: a file cannot be synced.
        """
        touched = {(n, t) for n, t, _ in self.staged}
        for key in touched:
            self._parts[key].sync()
        return touched

    def record(self, db: sqlite3.Connection) -> None:
        """Insert the staged chunks' rows in the caller's transaction."""
        db.executemany(
            "INSERT OR IGNORE INTO chunks (node, task_id, idx) VALUES (?, ?, ?)",
            sorted(self.staged),
        )
        self.staged.clear()

    def stage(
        self, node: str, task: str, headers: Mapping[str, Any], body: bytes
    ) -> bool:
        """Write a result chunk to its part file; its row waits for ``record()``.

        A chunk that contradicts its outputs' announcement marks those outputs
        failed; a malformed one is logged and dropped.

        Returns:
            False if the chunk cannot be placed yet (a node older than the
            ``size`` header, before its terminal event came): hand it back to
            the broker for later. True otherwise.

        Raises:
            StateError: the inbox database failed.
        """
        try:
            index, total = int(headers["index"]), int(headers["total"])
            sha = str(headers["sha256"])
            size = int(headers["size"]) if "size" in headers else None
            offset = int(headers["offset"]) if "offset" in headers else None
        except (KeyError, TypeError, ValueError):
            logger.warning("inbox: dropping a malformed chunk of %s/%s", node, task)
            return True
        status = self._output_row(node, task)
        if status is not None and status[0] in ("complete", "failed", "verifying"):
            return True  # a duplicate of outputs already handled
        if size is None:
            size = status[1] if status is not None else None
        if size is None:
            # An older node states no size; its terminal event will.
            return False
        try:
            part = self._part(node, task, sha, size, total)
            part.feed(index, total, body, offset)
        except StageOutError as e:
            self._fail(node, task, sha, size, total, str(e))
            return True
        self.staged.add((node, task, index))
        return True

    def _output_row(self, node: str, task: str) -> tuple[str, int, str, int] | None:
        rows = self._store.query(
            "SELECT status, size, sha256, chunks FROM outputs"
            " WHERE node = ? AND task_id = ?",
            (node, task),
        )
        return None if not rows else (rows[0][0], rows[0][1], rows[0][2], rows[0][3])

    def _part(
        self, node: str, task: str, sha: str, size: int, total: int
    ) -> Reassembler:
        key = (node, task)
        part = self._parts.get(key)
        if part is not None:
            if (part.sha256, part.size, part.chunks) != (sha, size, total):
                raise StageOutError("outputs: chunks announce two different archives")
            return part
        with self._store.transaction("announce outputs") as db:
            db.execute(
                "INSERT OR IGNORE INTO outputs (node, task_id, sha256, size, chunks,"
                " status, updated_at) VALUES (?, ?, ?, ?, ?, 'receiving', ?)",
                (node, task, sha, size, total, now_text()),
            )
            row = db.execute(
                "SELECT sha256, size, chunks FROM outputs"
                " WHERE node = ? AND task_id = ?",
                (node, task),
            ).fetchone()
            received = [
                i
                for (i,) in db.execute(
                    "SELECT idx FROM chunks WHERE node = ? AND task_id = ?",
                    (node, task),
                )
            ]
        if tuple(row) != (sha, size, total):
            raise StageOutError(
                f"outputs: chunks announce {sha[:12]}… ({size} bytes), but"
                f" {row[0][:12]}… ({row[1]} bytes) was announced before"
            )
        (self.root / "parts" / node).mkdir(parents=True, exist_ok=True, mode=0o700)
        part = Reassembler(
            self.root / "parts" / node / f"{task}.part",
            sha256=sha,
            size=size,
            chunks=total,
            max_bytes=self.max_bytes,
            received=received,
        )
        self._parts[key] = part
        return part

    def _fail(
        self, node: str, task: str, sha: str, size: int, chunks: int, why: str
    ) -> None:
        logger.error("inbox: outputs of %s/%s refused: %s", node, task, why)
        with self._store.transaction("fail outputs") as db:
            db.execute(
                "INSERT OR IGNORE INTO outputs (node, task_id, sha256, size, chunks,"
                " status, updated_at) VALUES (?, ?, ?, ?, ?, 'failed', ?)",
                (node, task, sha, max(size, 0), max(chunks, 1), now_text()),
            )
            db.execute(
                "UPDATE outputs SET status = 'failed', error = ?, updated_at = ?"
                " WHERE node = ? AND task_id = ?",
                (cut(why, 300), now_text(), node, task),
            )
        part = self._parts.pop((node, task), None)
        if part is not None:
            part.close()
        (self.root / "parts" / node / f"{task}.part").unlink(missing_ok=True)

    def check_announcement(self, node: str, task: str, outputs: dict[str, Any]) -> None:
        """The terminal event's ``outputs`` must match what the chunks said."""
        try:
            sha, size, chunks = (
                str(outputs["sha256"]),
                int(outputs["bytes"]),
                int(outputs["chunks"]),
            )
        except (KeyError, TypeError, ValueError):
            logger.warning("inbox: %s/%s announces malformed outputs", node, task)
            return
        row = self._output_row(node, task)
        if row is None:
            with self._store.transaction("announce outputs") as db:
                db.execute(
                    "INSERT OR IGNORE INTO outputs (node, task_id, sha256, size,"
                    " chunks, status, updated_at) VALUES (?, ?, ?, ?, ?,"
                    " 'receiving', ?)",
                    (node, task, sha, size, chunks, now_text()),
                )
            return
        if (row[2], row[1], row[3]) != (sha, size, chunks) and row[0] != "failed":
            # SECURITY: only what the node announced in its status event is kept.
            self._fail(
                node, task, sha, size, chunks,
                "outputs: chunks differ from the announcement in the status event",
            )  # fmt: skip

    def finish_if_complete(self, node: str, task: str) -> None:
        """Verify and unpack the outputs if every chunk is in and nobody else does."""
        with self._store.transaction("claim outputs") as db:
            got = db.execute(
                "SELECT COUNT(*) FROM chunks WHERE node = ? AND task_id = ?",
                (node, task),
            ).fetchone()[0]
            claimed = db.execute(
                "UPDATE outputs SET status = 'verifying', claimed_by = ?,"
                " updated_at = ? WHERE node = ? AND task_id = ?"
                " AND status = 'receiving' AND chunks = ?",
                (os.getpid(), now_text(), node, task, got),
            ).rowcount
        if not claimed:
            return
        part = self._parts.pop((node, task))
        part.received = set(range(part.chunks))  # other receivers wrote the rest
        dest_dir = self.root / node
        dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        archive = dest_dir / f"{task}.tar.gz"
        try:
            archive.unlink(missing_ok=True)  # a leftover of a killed verification
            part.write(archive)
            unpack_outputs(archive, dest_dir / task, max_bytes=self.max_bytes)
        except StageOutError as e:
            part.close()
            self._fail(node, task, part.sha256, part.size, part.chunks, str(e))
            return
        part.close()
        with self._store.transaction("complete outputs") as db:
            db.execute(
                "UPDATE outputs SET status = 'complete', updated_at = ?"
                " WHERE node = ? AND task_id = ?",
                (now_text(), node, task),
            )
            db.execute(
                "DELETE FROM chunks WHERE node = ? AND task_id = ?", (node, task)
            )
        logger.info("inbox: outputs of %s/%s verified into %s", node, task, archive)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
