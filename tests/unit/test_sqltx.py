"""The short sqlite steps: one write's shape, and opening while others open."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from femd.inbox.database import InboxDatabase
from femd.sqltx import immediate, while_busy


def _locked(path: Path) -> sqlite3.Connection:
    """A connection holding the write lock of *path* until closed."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE IF NOT EXISTS t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_while_busy_retries_a_real_busy_until_the_lock_goes(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite"
    holder = _locked(db)
    tries = 0

    def step() -> str:
        nonlocal tries
        tries += 1
        if tries == 3:
            holder.execute("ROLLBACK")
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        finally:
            other.close()
        return "open"

    assert while_busy(step, 10) == "open"
    assert tries == 3
    holder.close()


def test_while_busy_gives_up_at_its_deadline(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite"
    holder = _locked(db)

    def step() -> None:
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()

    began = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        while_busy(step, 0.3)
    assert time.monotonic() - began < 2
    holder.close()


def test_while_busy_raises_other_errors_at_once(tmp_path: Path) -> None:
    tries = 0

    def step() -> None:
        nonlocal tries
        tries += 1
        sqlite3.connect(":memory:").execute("SELECT * FROM missing")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        while_busy(step, 10)
    assert tries == 1


def test_immediate_rolls_back_a_failed_body(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "d.sqlite", isolation_level=None)
    db.execute("CREATE TABLE t (x UNIQUE)")
    with immediate(db):
        db.execute("INSERT INTO t VALUES (1)")

    def two_inserts_one_clashing() -> None:
        with immediate(db):
            db.execute("INSERT INTO t VALUES (2)")
            db.execute("INSERT INTO t VALUES (1)")

    with pytest.raises(sqlite3.IntegrityError):
        two_inserts_one_clashing()
    assert not db.in_transaction
    assert db.execute("SELECT x FROM t").fetchall() == [(1,)]


def _open_inbox(root: str) -> str:
    try:
        InboxDatabase(Path(root)).close()
    except Exception as e:  # noqa: BLE001 (reported to the parent)
        return f"{type(e).__name__}: {e}"
    return "ok"


def test_processes_opening_a_new_inbox_at_once_all_succeed(tmp_path: Path) -> None:
    # As `femd watch &` and `femd submit` did in the demo: both created the
    # inbox, and one got "database is locked" without waiting.
    fork = multiprocessing.get_context("fork")
    failures = []
    with fork.Pool(4) as pool:
        for n in range(30):
            got = pool.map(_open_inbox, [str(tmp_path / f"inbox-{n}")] * 4)
            failures += [g for g in got if g != "ok"]
    assert failures == []
