"""One sqlite write transaction, as the node's state and the inbox both take it.

Owns the shape of a short write: ``BEGIN IMMEDIATE`` (the write lock at once,
so a busy database fails here, not halfway), the body, then ``COMMIT``; any
error in the body rolls back and is raised. Locking between threads and the
translation of sqlite errors stay with the caller.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["immediate"]


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE``, the body, ``COMMIT``; ``ROLLBACK`` if the body raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
