"""Pruning the state on the retention the configuration sets.

Every ``retention_days`` (config key) old published outbox message goes, and
so does the payload of every task that ended that long ago; task rows with
their ids, decisions, reasons, signer keyids and hashes stay for good (replay
protection, audit). Runs at start, then every hour (or every half retention,
if shorter). Owns the timing; the SQL is ``State.prune()``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Final

from femd.errors import FemdError
from femd.state import State

__all__ = ["Retention"]

logger = logging.getLogger(__name__)

_EVERY_S: Final = 3600.0


class Retention:
    """When and how far back to prune the state."""

    def __init__(self, days: float) -> None:
        """Keep *days* of published messages and finished tasks' payloads."""
        self.keep = timedelta(days=days)
        self.every_s = min(_EVERY_S, max(1.0, self.keep.total_seconds() / 2))
        self._next = 0.0

    def due(self, now: float) -> bool:
        """True when it is time to prune (monotonic *now*)."""
        return now >= self._next

    def next_at(self) -> float:
        """When the next pruning is due (monotonic)."""
        return self._next

    def run(self, state: State, at: datetime, now: float) -> None:
        """Prune what is older than the retention at *at*; never raises."""
        self._next = now + self.every_s
        try:
            events, payloads = state.prune(at - self.keep)
        except FemdError as e:
            logger.warning("state: pruning failed, trying again later: %s", e)
            return
        if events or payloads:
            logger.info(
                "state: pruned %d published messages and %d task payloads"
                " older than %s",
                events,
                payloads,
                self.keep,
            )
