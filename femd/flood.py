"""Repeated rejections of unverifiable input, counted instead of written.

Anyone who can publish to the node's queue (the orchestrator's identity, or
whoever holds it) can send garbage as fast as the broker takes it. Each
message must still be refused, and never costs a task; but writing an audit
entry and a durable status event for each (an fsync per message) would turn a
flood into disk and journal load. ``Tally`` lets the first rejection of each
kind (its rule ids) in a 10 s window through in full; the others of that
window are only counted, and one summary follows when the window ends. Owns
the counting; the agent writes.
"""

from __future__ import annotations

from typing import Final

__all__ = ["Tally"]

WINDOW_S: Final = 10.0


class Tally:
    """Counts repeated rejections per kind within a window."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        """Start with an empty window."""
        self.window_s = window_s
        self._started: float | None = None
        self._seen: dict[tuple[str, ...], int] = {}

    def first(self, kind: tuple[str, ...], now: float) -> bool:
        """Count one rejection of *kind*; True if it is the first in the window."""
        if self._started is None:
            self._started = now
        count = self._seen.get(kind, 0)
        self._seen[kind] = count + 1
        return count == 0

    def next_at(self) -> float | None:
        """When the current window ends (monotonic), or None without one."""
        return None if self._started is None else self._started + self.window_s

    def flush(self, now: float) -> dict[tuple[str, ...], int]:
        """At the end of a window, return the repeats per kind (maybe none)."""
        if self._started is None or now - self._started < self.window_s:
            return {}
        repeats = {k: n - 1 for k, n in self._seen.items() if n > 1}
        self._started = None
        self._seen = {}
        return repeats
