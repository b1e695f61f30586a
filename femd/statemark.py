"""The birth certificate of a state database: replay protection cannot vanish.

Owns ``state.created`` (the database's name with the suffix ``.created``), a
small file written beside the database once its schema exists; its name does
not start with the database's, so ``rm state.sqlite*`` leaves it.
A database that is missing, empty or without a schema next to such a marker
was lost (truncated, deleted, restored wrongly): opening it as new would
forget every task id seen, and a replayed task would run again (DESIGN
"manifest": a replayed id never runs twice). ``check()`` refuses that with one
line; an operator who means to start afresh removes the marker. Does not
open the database.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from femd.errors import StateError, cut

__all__ = ["check", "marker_path", "write"]


def marker_path(db: Path) -> Path:
    """Return the marker file of database *db*."""
    return db.with_suffix(".created")


def check(db: Path, why: str) -> None:
    """Refuse a database that is *why* (``missing``, ``empty``) after a marker.

    Raises:
        StateError: a marker says a database was created here before.
    """
    marker = marker_path(db)
    try:
        created = marker.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"state: cannot read {cut(marker)}: {e.strerror}") from e
    raise StateError(
        f"state: {db} is {why}, but a state database was created there"
        f" ({cut(created, 40) or 'marker'}): starting afresh would lose replay"
        f" protection; restore it from a backup, or remove {marker} to start over"
    )


def write(db: Path) -> None:
    """Write *db*'s marker atomically (temp file, fsync, rename, fsync dir).

    Raises:
        StateError: the marker cannot be written.
    """
    marker = marker_path(db)
    tmp = marker.with_name(marker.name + ".tmp")
    text = f"created {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}\n"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, marker)
        dir_fd = os.open(marker.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise StateError(f"state: cannot write {cut(marker)}: {e.strerror}") from e
