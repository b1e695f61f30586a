"""Live task output: a running task's lines, sent as they come, rate-limited.

Owns following one task's captured stdout+stderr (``Handle.logs()``, which
the launcher caps at ``log_max_bytes``) and turning new whole lines into
best-effort ``femd.logs`` messages (routing key ``<node>.<task id>``,
``content_type`` ``text/plain``, headers ``seq``, ``dropped``,
``femd_task_output``). A token bucket per task (``live_log_bytes_s``, burst
``live_log_burst_bytes``) throttles a chatty task: lines beyond it are
dropped and counted in the next message's ``dropped`` (bytes), never queued
without bound. The bytes are the task's, sent as they are: nobody parses
them as femd records. The journal copy of the log is ``audit``'s business.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from femd.errors import FemdError
from femd.events import LOGS_EXCHANGE
from femd.launchers import Handle
from femd.messages import SideMessage

__all__ = ["LogFollower"]

logger = logging.getLogger(__name__)

# One message carries at most this much (a longer line goes in pieces).
_MESSAGE_BYTES: Final = 16 * 1024
_POLL_S: Final = 0.5


class LogFollower:
    """Sends what one task printed since the last ``poll()``.

    Args:
        handle: the running task.
        node: this node (routing key).
        publish: queues a best-effort message (``NodeLink.publish_soon``).
        rate_bytes_s: sustained bytes per second; 0 sends nothing.
        burst_bytes: what may go at once after a quiet spell.
    """

    def __init__(
        self,
        handle: Handle,
        *,
        node: str,
        publish: Callable[[SideMessage], None],
        rate_bytes_s: int,
        burst_bytes: int,
    ) -> None:
        """Start at the beginning of the task's output, with a full bucket."""
        self.handle = handle
        self.node = node
        self.publish = publish
        self.rate = rate_bytes_s
        self.burst = burst_bytes
        self.tokens = float(burst_bytes)
        self.offset = 0
        self.partial = b""
        # Microseconds at start: a follower started again after an agent
        # restart never reuses a seq (the orchestrator keeps one per seq).
        self.seq = time.time_ns() // 1000
        self.dropped = 0
        self.sent = 0
        self._batch = bytearray()
        self._last = time.monotonic()
        self._last_poll = 0.0

    def poll(self, *, final: bool = False) -> None:
        """Send new whole lines (all that is left when *final*); never raises."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        if not final and now - self._last_poll < _POLL_S:
            return
        self._last_poll = now
        try:
            fresh = self._read_new()
        except FemdError as e:
            logger.debug("task %s: live log unavailable: %s", self.handle.task_id, e)
            return
        data = self.partial + fresh
        cut = len(data) if final else data.rfind(b"\n") + 1
        lines, self.partial = data[:cut], data[cut:]
        if len(self.partial) > _MESSAGE_BYTES:  # a line without end: send a piece
            lines, self.partial = data, b""
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        for line in lines.splitlines(keepends=True):
            if len(line) <= self.tokens:
                self.tokens -= len(line)
                self._queue(line)
            else:
                self.dropped += len(line)  # throttled: counted, not kept
        self._flush()

    def _read_new(self) -> bytes:
        """Bytes of the captured output after ``offset`` (bounded by the launcher)."""
        got = bytearray()
        seen = 0
        for chunk in self.handle.logs():
            end = seen + len(chunk)
            if end > self.offset:
                got += chunk[max(0, self.offset - seen) :]
            seen = end
        self.offset = max(self.offset, seen)
        return bytes(got)

    def _queue(self, line: bytes) -> None:
        for at in range(0, len(line), _MESSAGE_BYTES):
            piece = line[at : at + _MESSAGE_BYTES]
            if len(self._batch) + len(piece) > _MESSAGE_BYTES:
                self._flush()
            self._batch += piece

    def _flush(self) -> None:
        batch = bytes(self._batch)
        self._batch = bytearray()
        if not batch and not self.dropped:
            return
        self.seq += 1
        self.sent += len(batch)
        self.publish(
            SideMessage(
                LOGS_EXCHANGE,
                f"{self.node}.{self.handle.task_id}",
                batch,
                content_type="text/plain",
                headers={
                    "seq": self.seq,
                    "dropped": self.dropped,
                    "femd_task_output": True,
                },
            )
        )
        self.dropped = 0
