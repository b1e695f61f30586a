"""A lost state database is an error, never a fresh start (replay protection)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from femd.errors import StateError
from femd.state import State
from femd.statemark import marker_path


def _db(tmp_path: Path) -> Path:
    db = tmp_path / "state.sqlite"
    State(db).close()
    assert marker_path(db).is_file()
    return db


@pytest.mark.parametrize("how", ["truncated", "deleted", "replaced-by-empty-db"])
def test_lost_database_is_refused(tmp_path: Path, how: str) -> None:
    db = _db(tmp_path)
    for f in tmp_path.glob("state.sqlite*"):
        f.unlink()
    if how == "truncated":
        db.write_bytes(b"")
    elif how == "replaced-by-empty-db":
        sqlite3.connect(db).execute("CREATE TABLE other (x)").connection.close()
    with pytest.raises(StateError, match="replay protection") as e:
        State(db)
    assert str(db) in str(e.value)
    assert str(marker_path(db)) in str(e.value)
    assert how == "replaced-by-empty-db" or not db.exists() or not db.stat().st_size


def test_removing_the_marker_starts_afresh(tmp_path: Path) -> None:
    db = _db(tmp_path)
    db.write_bytes(b"")
    marker_path(db).unlink()
    State(db).close()
    assert marker_path(db).is_file()


def test_a_database_from_before_markers_gets_one(tmp_path: Path) -> None:
    db = _db(tmp_path)
    marker_path(db).unlink()
    State(db).close()
    assert marker_path(db).is_file()
