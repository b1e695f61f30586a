"""Deliveries whose commit failed, tried again until the state takes them.

femd acks a delivery only after its task and decision are on disk (DESIGN
"broker"). When the state cannot be written (a full disk, an I/O error), the
delivery stays unacked: the broker will not send more than the prefetch
window, so forgetting it would stall intake until a restart. ``Retry`` keeps
such deliveries and hands them back after a backoff (0.5 s doubling to 5 s), so
intake recovers by itself within seconds once the state is writable again,
losing nothing. A delivery of a connection that has since closed is dropped:
the broker delivers it again on the new one. Owns no I/O and no policy.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Final

from femd.errors import FemdError
from femd.messages import Delivery

__all__ = ["Retry"]

logger = logging.getLogger(__name__)

_FIRST_S: Final = 0.5
_MOST_S: Final = 5.0


class Retry:
    """The deliveries waiting for the state to accept them, with their due times."""

    def __init__(self) -> None:
        """Start with nothing waiting."""
        self._waiting: deque[tuple[float, Delivery]] = deque()
        self._delay = 0.0
        self._failing_since: float | None = None

    def __len__(self) -> int:
        """How many deliveries are waiting."""
        return len(self._waiting)

    def failed(self, d: Delivery, error: FemdError, now: float) -> None:
        """Keep *d*, whose commit just failed, for another try after a backoff."""
        self._delay = min(_MOST_S, max(_FIRST_S, self._delay * 2))
        if self._failing_since is None:
            self._failing_since = now
            logger.error(
                "delivery not committed, trying again until the state takes it: %s",
                error,
            )
        self._waiting.append((now + self._delay, d))

    def succeeded(self, now: float) -> None:
        """Say a commit worked: the backoff starts over."""
        if self._failing_since is not None:
            logger.warning(
                "state writable again after %.1f s; %d deliveries still to commit",
                now - self._failing_since,
                len(self._waiting),
            )
        self._delay = 0.0
        self._failing_since = None

    def due(self, now: float, generation: int) -> list[Delivery]:
        """Return the deliveries to try now; drop those of a closed connection."""
        ready = []
        while self._waiting and self._waiting[0][0] <= now:
            _, d = self._waiting.popleft()
            if d.generation == generation:
                ready.append(d)
        return ready

    def next_at(self) -> float | None:
        """When the next delivery is due (monotonic), or None."""
        return self._waiting[0][0] if self._waiting else None
