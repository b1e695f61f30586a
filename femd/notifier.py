"""systemd's notify protocol, as the agent speaks it.

Owns the notify socket (non-blocking: a reader that stops reading must never
block the agent's loop) and the watchdog's timing (``WATCHDOG=1`` at half of
systemd's ``WatchdogSec``, only when it asked for it). Does not decide what to
say: READY, STATUS, RELOADING and STOPPING are the agent's (``femd.agent``).
"""

from __future__ import annotations

import os
import time

import sdnotify

__all__ = ["Notifier"]


def _watchdog_interval() -> float | None:
    """WatchdogSec for this process in seconds, or None (like sd_watchdog_enabled)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


class Notifier:
    """sd_notify messages and watchdog pings; silent outside systemd."""

    def __init__(self) -> None:
        """Open the socket ``$NOTIFY_SOCKET`` names, if any; read the watchdog."""
        self._sd = sdnotify.SystemdNotifier()
        if self._sd.socket is not None:
            self._sd.socket.setblocking(False)
        self._watchdog_s = _watchdog_interval()
        self._last_ping = 0.0

    def notify(self, text: str) -> None:
        """Send one message (``READY=1``, ``STATUS=...``); dropped if none hears."""
        self._sd.notify(text)

    def ping(self) -> None:
        """``WATCHDOG=1`` if half the watchdog interval has passed since the last."""
        if self._watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._watchdog_s / 2:
            self._last_ping = now
            self.notify("WATCHDOG=1")

    def next_at(self) -> float | None:
        """When the next ping is due (monotonic), or None without a watchdog."""
        if self._watchdog_s is None:
            return None
        return self._last_ping + self._watchdog_s / 2

    def close(self) -> None:
        """Close the socket."""
        if self._sd.socket is not None:
            self._sd.socket.close()
