"""Publisher confirms of one channel, many messages in flight."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pika

from femd.errors import BrokerError

__all__ = ["Confirms"]


class Confirms:
    """Publisher confirms of one channel, many in flight (RabbitMQ "confirms").

    Each publish takes the channel's next delivery tag (from 1); the broker
    acks or nacks tags, one or all up to a tag (``multiple``), in its own time.
    ``acked`` collects the outbox seqs it took responsibility for.
    """

    def __init__(self, on_confirm: Callable[[], None] | None = None) -> None:
        """No message in flight; *on_confirm* is called after each confirm."""
        self._on_confirm = on_confirm or (lambda: None)
        self.seqs: dict[int, int | None] = {}  # tag -> outbox seq (None: best effort)
        self.next_tag = 1
        self.acked: list[int] = []
        self.nacked = 0

    def sent(self, seq: int | None) -> None:
        """Note that outbox message *seq* (None: a best-effort one) was published."""
        self.seqs[self.next_tag] = seq
        self.next_tag += 1

    def on_confirm(self, frame: Any) -> None:  # noqa: ANN401 (a pika method frame)
        """Take a ``Basic.Ack`` or ``Basic.Nack`` (pika calls this)."""
        method = frame.method
        tag = int(method.delivery_tag)
        tags = [t for t in self.seqs if t <= tag] if method.multiple else [tag]
        ok = isinstance(method, pika.spec.Basic.Ack)
        for t in tags:
            if t not in self.seqs:
                continue
            seq = self.seqs.pop(t)
            if seq is None:
                continue  # best effort: nobody waits for it
            if ok:
                self.acked.append(seq)
            else:
                self.nacked += 1
        self._on_confirm()

    def take_acked(self) -> list[int]:
        """The seqs confirmed since the last call.

        Raises:
            BrokerError: the broker refused (nacked) a message: reconnect, and
                publish it again then.
        """
        if self.nacked:
            raise BrokerError("the broker refused (nack) an outbox message")
        acked, self.acked = self.acked, []
        return acked
