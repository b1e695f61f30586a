"""What the node's broker link carries: deliveries, best-effort messages, the outbox.

``Link`` is the link as the agent uses it (``femd.broker.NodeLink``; tests
pass ``tests/fakes.FakeLink``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from femd.config import BrokerConfig

__all__ = [
    "Delivery",
    "Link",
    "LinkFactory",
    "Outbox",
    "OutboxMessage",
    "SideMessage",
]


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


class Link(Protocol):
    """The node's broker link as the agent uses it (``femd.broker.NodeLink``).

    Deliveries arrive in ``inbox``; each is settled once with ``ack`` (after
    its decision is committed) or ``reject`` (dead-lettered). ``wake`` says
    the outbox has something new; ``publish_soon`` queues a best-effort
    message.
    """

    inbox: queue.Queue[Delivery]
    connected: threading.Event
    ever_connected: threading.Event
    last_error: str

    @property
    def generation(self) -> int:
        """The current connection's number; deliveries of older ones are void."""
        ...

    def start(self) -> None:
        """Connect and serve (in the background)."""
        ...

    def ack(self, delivery: Delivery) -> None:
        """Ack a committed *delivery*."""
        ...

    def reject(self, delivery: Delivery) -> None:
        """Reject *delivery* without requeueing (dead-letter)."""
        ...

    def publish_soon(self, message: SideMessage) -> None:
        """Queue a best-effort message; never blocks."""
        ...

    def wake(self) -> None:
        """Say the outbox (or the settlements) have something new."""
        ...

    def hold_intake(self) -> None:
        """Before ``start()``: take no delivery until ``open_intake()``."""
        ...

    def open_intake(self) -> None:
        """Start taking deliveries (after ``hold_intake()``)."""
        ...

    def pause_consuming(self) -> None:
        """Stop taking deliveries."""
        ...

    def stop(self, flush_s: float = 5.0) -> None:
        """Flush the outbox for up to *flush_s*, then end."""
        ...


class LinkFactory(Protocol):
    """How the agent makes its link (``NodeLink``'s constructor)."""

    def __call__(
        self,
        cfg: BrokerConfig,
        node: str,
        outbox: Outbox,
        *,
        prefetch: int,
        max_body: int,
        on_state: Callable[[bool, str], None] | None = None,
        on_delivery: Callable[[], None] | None = None,
    ) -> Link:
        """A link for *node*, not started."""
        ...
