"""Pruning keeps what replay protection and audit need; floods are counted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from femd.flood import Tally
from femd.retention import Retention
from femd.state import State

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _finished(state: State, task_id: str, at: datetime) -> None:
    state.record(
        task_id=task_id,
        project="p",
        kind="Task",
        manifest_sha256="a" * 64,
        payload=b'{"secret": "payload"}',
        signer_keyids=["b" * 64],
        launcher="process",
        decision="allow",
        reasons=[],
        node="n",
        at=at,
    )
    state.transition(task_id, "succeeded", node="n", at=at, exit_code=0)


def test_prune_forgets_old_events_and_payloads_only(tmp_path: Path) -> None:
    state = State(tmp_path / "state.sqlite")
    _finished(state, "old", T0)
    _finished(state, "new", T0 + timedelta(days=40))
    state.record(
        task_id="waiting",
        project="p",
        kind="Task",
        manifest_sha256="c" * 64,
        payload=b"{}",
        signer_keyids=[],
        launcher="process",
        decision="allow",
        reasons=[],
        node="n",
        at=T0,
    )
    pending = state.pending_events(100)
    state.mark_published([e.seq for e in pending if b'"new"' not in e.body][:-1])
    events, payloads = state.prune(T0 + timedelta(days=10))
    assert payloads == 1  # "old" only: "waiting" has not ended, "new" is recent
    assert events == len(pending) - 3  # unpublished and recent stay
    old = state.get("old")
    assert old is not None
    assert old.payload is None
    assert (old.state, old.decision, old.manifest_sha256) == (
        "succeeded",
        "allow",
        "a" * 64,
    )
    assert old.signer_keyids == ("b" * 64,)
    assert [s for s, _, _ in state.transitions("old")] == [
        "received",
        "queued",
        "succeeded",
    ]
    assert state.get("waiting").payload == b"{}"  # type: ignore[union-attr]
    assert state.get("new").payload is not None  # type: ignore[union-attr]
    # Replay protection holds after pruning.
    assert not state.record(
        task_id="old",
        project="p",
        kind="Task",
        manifest_sha256="a" * 64,
        payload=b"{}",
        signer_keyids=[],
        launcher="process",
        decision="allow",
        reasons=[],
        node="n",
        at=T0 + timedelta(days=50),
    )
    assert state.prune(T0 + timedelta(days=10)) == (0, 0)


def test_retention_runs_at_start_then_every_hour(tmp_path: Path) -> None:
    state = State(tmp_path / "state.sqlite")
    r = Retention(30)
    assert r.every_s == 3600
    assert r.due(0.0)
    r.run(state, T0, 0.0)
    assert not r.due(3599.0)
    assert r.due(3600.0)
    assert Retention(1 / 86400).every_s == 1.0


def test_tally_lets_the_first_of_each_kind_through_per_window() -> None:
    t = Tally(window_s=10)
    assert t.first(("input.envelope",), 0.0)
    assert not t.first(("input.envelope",), 1.0)
    assert not t.first(("input.envelope",), 2.0)
    assert t.first(("signature.threshold",), 3.0)
    assert t.flush(9.9) == {}
    assert t.flush(10.0) == {("input.envelope",): 2}
    assert t.flush(30.0) == {}
    assert t.first(("input.envelope",), 31.0)
