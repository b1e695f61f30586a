"""Unavailable launchers are probed again with back-off, and only then."""

from __future__ import annotations

from femd.reprobe import Reprobe


def test_backoff_from_two_seconds_to_five_minutes() -> None:
    r = Reprobe()
    r.reset(0.0, unavailable=False)
    assert r.next_at() is None
    assert not r.due(1e9)
    r.reset(100.0, unavailable=True)
    assert not r.due(101.9)
    assert r.due(102.0)
    delays = []
    now = 102.0
    for _ in range(10):
        r.probed(now, unavailable=True)
        at = r.next_at()
        assert at is not None
        delays.append(at - now)
        now = at
    assert delays[:3] == [4.0, 8.0, 16.0]
    assert delays[-1] == 300.0
    r.probed(now, unavailable=False)
    assert r.next_at() is None
    r.reset(now, unavailable=True)
    assert r.next_at() == now + 2.0
