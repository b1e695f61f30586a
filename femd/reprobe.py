"""When to probe again a launcher that failed its probe.

A probe runs a real, empty sandbox; it can fail for a passing reason (the task
user short of processes, a podman service restarting). A launcher found
unavailable is probed again after 2 s, then after twice as long each time up to
5 minutes, until it works; a reload probes everything at once and starts the
back-off over. Owns only the timing; the agent probes and reports.
"""

from __future__ import annotations

from typing import Final

__all__ = ["Reprobe"]

FIRST_S: Final = 2.0
MOST_S: Final = 300.0


class Reprobe:
    """Back-off timer for probing unavailable launchers again."""

    def __init__(self, first_s: float = FIRST_S, most_s: float = MOST_S) -> None:
        """Nothing to probe until ``reset()`` says some launcher is unavailable."""
        self._first_s = first_s
        self._most_s = most_s
        self._delay = first_s
        self._next: float | None = None

    def reset(self, now: float, *, unavailable: bool) -> None:
        """After a full probe: schedule the first retry if anything failed."""
        self._delay = self._first_s
        self._next = now + self._delay if unavailable else None

    def due(self, now: float) -> bool:
        """True when it is time to probe the unavailable launchers again."""
        return self._next is not None and now >= self._next

    def probed(self, now: float, *, unavailable: bool) -> None:
        """After a retry: back off further, or stop when all work."""
        if not unavailable:
            self._next = None
            return
        self._delay = min(self._most_s, self._delay * 2)
        self._next = now + self._delay

    def next_at(self) -> float | None:
        """When the next retry is due (monotonic), or None."""
        return self._next
