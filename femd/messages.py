"""What the node's broker link carries: deliveries, best-effort messages, the outbox."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

__all__ = ["Delivery", "Outbox", "OutboxMessage", "SideMessage"]


class Delivery(msgspec.Struct, frozen=True):
    """One message from the node's queue; settle it through the link that gave it.

    ``problem`` says why its AMQP properties could not be decoded (femd rejects
    such a message on its own, see ``femd.amqpframe``); else None.
    ``too_large`` is the size of a body over the link's limit, dropped as it
    arrived (``body`` is then empty); else None.
    """

    generation: int
    tag: int
    redelivered: bool
    body: bytes
    problem: str | None = None
    too_large: int | None = None


class SideMessage(msgspec.Struct, frozen=True):
    """A best-effort message: published when the link can, lost if it cannot."""

    exchange: str
    routing_key: str
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, Any] | None = None


class OutboxMessage(Protocol):
    """What the link publishes from the outbox."""

    seq: int
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] | None


class Outbox(Protocol):
    """The agent's durable outbox (``femd.state``), as the link sees it."""

    def pending_events(self, limit: int = 100) -> list[Any]:
        """Unpublished messages in seq order."""
        ...

    def mark_published(self, seqs: list[int]) -> None:
        """Forget messages the broker confirmed."""
        ...
