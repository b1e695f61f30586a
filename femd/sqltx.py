"""Short sqlite steps as the node's state and the inbox both take them.

Owns the shape of a short write: ``BEGIN IMMEDIATE`` (the write lock at once,
so a busy database fails here, not halfway), the body, then ``COMMIT``; any
error in the body rolls back and is raised. And the one retry of opening a
database that other processes open at the same moment. Locking between threads
and the translation of sqlite errors stay with the caller.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, TypeVar

__all__ = ["immediate", "while_busy"]

T = TypeVar("T")

# SQLITE_BUSY, SQLITE_LOCKED (primary codes; extended codes keep them in the
# low byte).
_BUSY: Final = frozenset({5, 6})


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE``, the body, ``COMMIT``; ``ROLLBACK`` if the body raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def while_busy(step: Callable[[], T], seconds: float) -> T:
    """*step*, run again while sqlite answers "database is locked", for *seconds*.

    The busy timeout covers waiting for another connection's lock, but not
    every path: two processes opening a new database at once (one switching it
    to WAL while the other reads its header, or recovering its WAL index) get
    ``SQLITE_BUSY`` at once, without the busy handler. Opening is idempotent,
    so it is tried again, with a short growing pause, until *seconds* pass.

    Raises:
        sqlite3.Error: a step failed for another reason, or stayed busy.
    """
    deadline = time.monotonic() + seconds
    pause = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            code = getattr(e, "sqlite_errorcode", None)
            if code is None or code & 0xFF not in _BUSY:
                raise
            if time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.25)
