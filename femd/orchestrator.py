"""The orchestrator's side of the wire: publishing tasks, receiving everything.

Owns publishing envelopes to ``femd.tasks`` and the ``Receiver``: the one
consumer of the operator's durable queues (``femd.orchestrator.events``,
``.results``, ``.nodes``, ``.logs``; see ``packaging/rabbitmq``) that stages
every delivery in the ``Inbox``, commits it to disk and only then acks it,
reconnecting with backoff when the broker goes away. What is received is the
inbox's business; what to show is ``femd.client``'s. Runs where the signing
happens, never on a data node.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import pika
import pika.exceptions

from femd.amqpconn import connection_parameters, describe
from femd.config import OrchestratorConfig
from femd.envelope import decode_envelope
from femd.errors import BrokerError, FemdError
from femd.events import (
    EVENTS_QUEUE,
    LOGS_QUEUE,
    NODES_QUEUE,
    RESULTS_QUEUE,
    TASKS_EXCHANGE,
)
from femd.events import TERMINAL_STATES as TERMINAL
from femd.inbox import Inbox
from femd.manifest import Manifest, decode_manifest

__all__ = [
    "EVENTS_QUEUE",
    "LOGS_QUEUE",
    "NODES_QUEUE",
    "RESULTS_QUEUE",
    "TERMINAL",
    "Receiver",
    "submit",
]

logger = logging.getLogger(__name__)

# Unacked deliveries per queue: bounds the receiver's memory (chunks are up
# to ``result_chunk_bytes`` each).
_PREFETCH: Final = {
    EVENTS_QUEUE: 200,
    RESULTS_QUEUE: 16,
    NODES_QUEUE: 50,
    LOGS_QUEUE: 100,
}
_ERRORS: Final = (pika.exceptions.AMQPError, OSError, ssl.SSLError)
# Deliveries gathered under one commit: at most this many, for at most this long.
_GATHER_MAX: Final = 64
_GATHER_S: Final = 0.1


def _connect(cfg: OrchestratorConfig) -> pika.BlockingConnection:
    params = connection_parameters(cfg.broker)
    try:
        return pika.BlockingConnection(params)
    except _ERRORS as e:
        raise BrokerError(f"broker {params.host}:{params.port}: {describe(e)}") from e


def submit(cfg: OrchestratorConfig, nodes: Iterable[str], envelope: bytes) -> Manifest:
    """Publish *envelope* to each node's queue with publisher confirms.

    The envelope is decoded first (never publish garbage); its signatures are
    the nodes' business. Returns the manifest.

    Raises:
        EnvelopeError: the envelope is malformed.
        ManifestError: its payload is not a manifest.
        BrokerError: the broker is unreachable, refused us, or has no queue
            for a node.
    """
    _, payload = decode_envelope(envelope)
    manifest = decode_manifest(payload)
    conn = _connect(cfg)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for node in nodes:
            props = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=manifest.id,
            )
            try:
                ch.basic_publish(TASKS_EXCHANGE, node, envelope, props, mandatory=True)
            except pika.exceptions.UnroutableError as e:
                raise BrokerError(
                    f"submit: the broker has no queue for node {node!r}"
                ) from e
        return manifest
    except _ERRORS as e:
        raise BrokerError(f"submit: {describe(e)}") from e
    finally:
        try:
            conn.close()
        except _ERRORS:
            logger.debug("submit: close failed", exc_info=True)


class Receiver:
    """Consumes the orchestrator's queues into an ``Inbox``: commit, then ack.

    Driven by its caller: ``pump()`` connects when needed (backoff with
    jitter after a failure, each distinct failure logged once), serves the
    broker for a while, commits what came and acks it. A lost connection
    hands unacked deliveries back to the broker; they come again and the
    inbox ignores what it already has.

    Args:
        cfg: the orchestrator's broker identity.
        inbox: where deliveries go before they are acked.
    """

    def __init__(self, cfg: OrchestratorConfig, inbox: Inbox) -> None:
        """Prepare; nothing connects before ``pump()``."""
        self._cfg = cfg
        self._params: pika.ConnectionParameters | None = None
        self._inbox = inbox
        self._conn: pika.BlockingConnection | None = None
        self._acks: list[tuple[Any, int, bool]] = []
        self._backoff = 0.5
        self._retry_at = 0.0
        self._reported: set[str] = set()
        self.connected = False
        self.last_error = ""

    def _connect(self) -> None:
        if self._params is None:
            self._params = connection_parameters(self._cfg.broker)
        conn = pika.BlockingConnection(self._params)
        handlers: dict[str, Callable[[Any, Any, Any, bytes], bool | None]] = {
            EVENTS_QUEUE: lambda _c, m, _p, b: self._inbox.stage_event(
                m.routing_key, b
            ),
            RESULTS_QUEUE: lambda _c, m, p, b: self._inbox.stage_chunk(
                m.routing_key, p.headers or {}, b
            ),
            NODES_QUEUE: lambda _c, m, _p, b: self._inbox.stage_node(m.routing_key, b),
            LOGS_QUEUE: lambda _c, m, p, b: self._inbox.stage_log(
                m.routing_key, p.headers or {}, b
            ),
        }
        for queue, handle in handlers.items():
            ch = conn.channel()
            try:
                ch.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as e:
                if queue in (EVENTS_QUEUE, RESULTS_QUEUE):
                    conn.close()
                    raise
                # Definitions from before node status and live logs.
                logger.warning("receive: no queue %s on the broker (%s)", queue, e)
                continue
            ch.basic_qos(prefetch_count=_PREFETCH[queue])
            ch.basic_consume(queue, self._deliver(handle))
        self._conn = conn

    def _deliver(
        self, handle: Callable[[Any, Any, Any, bytes], bool | None]
    ) -> Callable[[Any, Any, Any, bytes], None]:
        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:  # noqa: ANN401
            later = handle(ch, method, props, body) is False
            self._acks.append((ch, method.delivery_tag, later))

        return on_message

    def _gather(self) -> None:
        """Take what keeps arriving for a moment, so one commit (fsync) covers it."""
        assert self._conn is not None  # noqa: S101 (connected)
        until = time.monotonic() + _GATHER_S
        while self._acks and len(self._acks) < _GATHER_MAX:
            before = len(self._acks)
            self._conn.process_data_events(time_limit=0.01)
            if len(self._acks) == before or time.monotonic() > until:
                return

    def _settle(self) -> None:
        """Commit what was staged, then ack it (DESIGN: ack after commit).

        A delivery the inbox cannot place yet (an old node's chunk before its
        terminal event) goes back to the broker instead.
        """
        self._inbox.commit()
        acks, self._acks = self._acks, []
        for ch, tag, later in acks:
            if later:
                ch.basic_nack(tag, requeue=True)
            else:
                ch.basic_ack(tag)

    def pump(self, time_limit: float = 0.2) -> None:
        """Serve the broker for about *time_limit* seconds; never raises on I/O.

        Raises:
            BrokerError: the TLS files cannot be loaded (a configuration error).
            StateError: the inbox cannot be written (nothing is acked).
        """
        if self._conn is None:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, time_limit))
                return
            try:
                self._connect()
            except _ERRORS as e:
                self._failed(e)
                return
            self.connected = True
            self._backoff = 0.5
            self._reported.clear()
            logger.info("receive: connected to %s", self._cfg.broker.url)
        assert self._conn is not None  # noqa: S101 (set by _connect)
        try:
            self._conn.process_data_events(time_limit=time_limit)
            self._gather()
            self._settle()
        except _ERRORS as e:
            self._failed(e)
        except FemdError:
            self.close()  # unacked deliveries go back to the broker
            raise

    def _failed(self, e: BaseException) -> None:
        why = describe(e)
        if self.connected or why not in self._reported:
            logger.warning("receive: %s; reconnecting with backoff", why)
        self._reported.add(why)
        self.last_error = why
        self.close()
        delay = min(self._backoff, self._cfg.broker.reconnect_max_s)
        self._retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)  # noqa: S311
        self._backoff = min(self._backoff * 2, self._cfg.broker.reconnect_max_s)

    def close(self) -> None:
        """Close the connection; unacked deliveries are redelivered later."""
        conn, self._conn = self._conn, None
        self._acks.clear()
        self.connected = False
        if conn is None:
            return
        try:
            if conn.is_open:
                conn.close()
        except _ERRORS:
            logger.debug("receive: close failed", exc_info=True)
