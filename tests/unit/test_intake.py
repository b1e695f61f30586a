"""Deliveries whose commit failed come back after a backoff, none lost."""

from __future__ import annotations

from femd.errors import StateError
from femd.intake import Retry
from femd.messages import Delivery


def _d(tag: int, generation: int = 1) -> Delivery:
    return Delivery(generation, tag, False, b"{}")


def test_backoff_doubles_to_five_seconds_and_resets() -> None:
    r = Retry()
    full = StateError("state: record failed: database or disk is full")
    r.failed(_d(1), full, now=0.0)
    assert r.next_at() == 0.5
    assert r.due(0.4, 1) == []
    assert r.due(0.5, 1) == [_d(1)]
    for i, delay in enumerate([1.0, 2.0, 4.0, 5.0, 5.0], start=2):
        r.failed(_d(i), full, now=10.0)
        assert r.next_at() == 10.0 + delay
        r.due(100.0, 1)
    r.succeeded(now=20.0)
    r.failed(_d(9), full, now=30.0)
    assert r.next_at() == 30.5
    assert len(r) == 1


def test_deliveries_of_a_closed_connection_are_dropped() -> None:
    r = Retry()
    full = StateError("full")
    r.failed(_d(1, generation=1), full, now=0.0)
    r.failed(_d(2, generation=2), full, now=0.0)
    assert r.due(10.0, 2) == [_d(2, generation=2)]
    assert len(r) == 0
