"""The node's AMQP link to RabbitMQ: one I/O thread owns its pika objects.

``NodeLink`` consumes ``femd.node.<node>``, acks only what the agent says is
committed, and drains the state outbox with publisher confirms (counted by
``femd.confirms``; the mTLS/EXTERNAL parameters come from ``femd.amqpconn``).
The thread never runs task work, so heartbeats are never starved (DESIGN
"broker topology"). No pika error escapes: they become ``BrokerError`` or log
lines.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import pika
import pika.exceptions

from femd import amqpframe
from femd.amqpconn import connection_parameters, describe
from femd.config import BrokerConfig
from femd.confirms import Confirms
from femd.errors import BrokerError, StateError, cut
from femd.events import (
    EVENTS_EXCHANGE,
    LOGS_EXCHANGE,
    NODES_EXCHANGE,
    RESULTS_EXCHANGE,
    TASKS_EXCHANGE,
    node_queue,
)
from femd.messages import Delivery, Outbox, SideMessage
from femd.model import MAX_ENVELOPE_BYTES

__all__ = [
    "EVENTS_EXCHANGE",
    "LOGS_EXCHANGE",
    "NODES_EXCHANGE",
    "RESULTS_EXCHANGE",
    "TASKS_EXCHANGE",
    "Delivery",
    "NodeLink",
    "Outbox",
    "SideMessage",
    "node_queue",
]

logger = logging.getLogger(__name__)

# Best-effort messages waiting for the link at most (older ones are dropped).
_SIDE_MAX: Final = 256

# Errors that mean "this connection is gone; reconnect".
_LINK_ERRORS: Final = (pika.exceptions.AMQPError, OSError, ssl.SSLError, BrokerError)
# The I/O loop's longest wait; wake() and broker data end it sooner.
_POLL_S: Final = 0.2
# Outbox messages published between two turns of the I/O loop.
_BATCH: Final = 20
# Outbox messages published and not confirmed yet, at most.
_IN_FLIGHT: Final = 2 * _BATCH


def _nothing() -> None:
    """A no-op scheduled from another thread only to end the I/O loop's wait."""


class NodeLink(threading.Thread):
    """The agent's broker thread: consume, ack-after-commit, outbox drain.

    Deliveries land in ``inbox``. The agent calls ``ack()`` once the task and
    its decision are committed, and ``wake()`` after writing the outbox.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        node: str,
        outbox: Outbox,
        *,
        prefetch: int,
        max_body: int = MAX_ENVELOPE_BYTES,
        on_state: Callable[[bool, str], None] | None = None,
        on_delivery: Callable[[], None] | None = None,
    ) -> None:
        """Prepare the link; nothing connects until ``start()``.

        A delivery whose body is over *max_body* bytes comes with an empty
        body and its size in ``too_large`` (never held: ``amqpframe``).
        *on_state* hears every connect and disconnect; *on_delivery* is called
        (in the link's thread) after each delivery is put in ``inbox``.

        Raises:
            BrokerError: the broker configuration is unusable.
        """
        super().__init__(name="femd-broker", daemon=True)
        amqpframe.install()
        self._params = connection_parameters(cfg)
        self._cfg = cfg
        self._node = node
        self._outbox = outbox
        self._prefetch = prefetch
        self._max_body = max_body
        self._on_state = on_state or (lambda up, why: None)
        self._on_delivery = on_delivery or _nothing
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        # (delivery, what to do): "ack", "reject" (dead-letter) or "requeue".
        self._acks: queue.SimpleQueue[tuple[Delivery, str]] = queue.SimpleQueue()
        self._generation = 0
        self._halt = threading.Event()
        self._pause = threading.Event()
        self._intake = threading.Event()  # cleared by hold_intake()
        self._intake.set()
        self._wake = threading.Event()
        self._consuming = False
        self.connected = threading.Event()
        self.ever_connected = threading.Event()
        self.last_error = ""
        self._conn: pika.BlockingConnection | None = None
        # deque append/popleft are atomic: the agent's threads add, the link takes.
        self._side: collections.deque[SideMessage] = collections.deque(maxlen=_SIDE_MAX)

    # -- API for the agent thread -------------------------------------------

    def publish_soon(self, message: SideMessage) -> None:
        """Queue a best-effort message (node status, live log); never blocks.

        At most ``_SIDE_MAX`` wait; beyond that the oldest is dropped. Lost if
        the broker is away: the next status or log batch supersedes it.
        """
        self._side.append(message)
        self.wake()

    def ack(self, delivery: Delivery) -> None:
        """Ack a committed *delivery*; a stale generation is dropped (redelivered)."""
        self._acks.put((delivery, "ack"))
        self.wake()

    def reject(self, delivery: Delivery) -> None:
        """Reject *delivery* without requeueing: the broker dead-letters it."""
        self._acks.put((delivery, "reject"))
        self.wake()

    def requeue(self, delivery: Delivery) -> None:
        """Hand *delivery* back to the queue; the broker delivers it again."""
        self._acks.put((delivery, "requeue"))
        self.wake()

    @property
    def generation(self) -> int:
        """The current connection's number; deliveries of older ones are void."""
        return self._generation

    def wake(self) -> None:
        """Say the outbox (or the ack queue) has something new.

        Interrupts the I/O loop's wait at once: with a prefetch window full,
        the broker sends nothing until our acks go out, so waiting for data
        before sending them would cost a full poll period per delivery.
        """
        self._wake.set()
        conn = self._conn
        if conn is None:
            return
        # The one pika call that is safe from another thread; it refuses a
        # closing or closed connection, whose loop is not waiting anyway.
        with contextlib.suppress(*_LINK_ERRORS):
            conn.add_callback_threadsafe(_nothing)

    def hold_intake(self) -> None:
        """Connect and publish, but take no delivery until ``open_intake()``.

        Called before ``start()`` by a link that connects before its agent is
        built (``femd.earlylink``): an agent that then fails to start (a bad
        policy) has taken, and handed back, nothing; each hand-back would
        count towards the queue's delivery limit.
        """
        self._intake.clear()

    def open_intake(self) -> None:
        """Start taking deliveries (after ``hold_intake()``)."""
        self._intake.set()
        self.wake()

    def pause_consuming(self) -> None:
        """Stop taking deliveries (SIGTERM); unacked ones are handed back on close."""
        self._pause.set()
        self.wake()

    def stop(self, flush_s: float = 5.0) -> None:
        """Flush the outbox for up to *flush_s*, close the connection, end."""
        self._pause.set()
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline and self.connected.is_set():
            if not self._outbox.pending_events(1) and not self._side:
                break
            self.wake()
            time.sleep(0.05)
        self._halt.set()
        self.wake()
        self.join(timeout=flush_s + 5)

    # -- the thread -----------------------------------------------------------

    def run(self) -> None:
        """Connect, serve, reconnect with exponential backoff and jitter.

        While the broker cannot be reached, each distinct failure is logged
        once (a refused certificate is an operator error to explain, not a
        line per retry); a connection that was up and drops is logged each
        time. Backoff starts again from its minimum after a good connection.
        """
        backoff = 0.5
        reported: set[str] = set()
        while not self._halt.is_set():
            try:
                self._serve()
            except _LINK_ERRORS as e:
                why = describe(e)
                if self.connected.is_set():
                    logger.warning("broker: connection lost: %s; reconnecting", why)
                elif why not in reported:
                    hint = ""
                    if why.endswith("(EOF)"):
                        # TLS 1.3: a refused client certificate may show only so.
                        hint = " (is our client certificate trusted?)"
                    logger.warning(
                        "broker: cannot connect to %s:%s: %s%s; retrying with backoff",
                        self._params.host,
                        self._params.port,
                        why,
                        hint,
                    )
                reported.add(why)
                self.last_error = why
            except StateError as e:
                # The outbox could not be marked (a full disk): what was sent
                # is sent again after the reconnect; consumers dedupe by seq.
                self.last_error = str(e)
                logger.warning("broker: %s; reconnecting", e)
            except Exception as e:  # the link thread must never die
                self.last_error = f"internal error: {type(e).__name__}: {cut(e)}"
                logger.exception("broker: %s; reconnecting", self.last_error)
            finally:
                if self.connected.is_set():
                    backoff = 0.5
                    reported.clear()
                self._close()
            if self._halt.is_set():
                break
            delay = min(backoff, self._cfg.reconnect_max_s) * random.uniform(0.5, 1.0)  # noqa: S311
            backoff = min(backoff * 2, self._cfg.reconnect_max_s)
            self._halt.wait(delay)

    def _serve(self) -> None:
        conn = pika.BlockingConnection(self._params)
        self._conn = conn
        self._generation += 1
        consume = conn.channel()
        # SECURITY: with a prefetch window of N, the agent holds at most N
        # bodies of max_body bytes; a longer one costs a frame, not its size.
        consume._impl._content_assembler = amqpframe.BoundedAssembler(self._max_body)
        publish = conn.channel()
        # A confirm ends the loop's wait, as wake() does: the next turn marks
        # it published and fills the window again.
        confirms = Confirms(self.wake)
        self._select_confirms(conn, publish, confirms)
        q = node_queue(self._node)
        # The node has no configure permission: passive declares only check the
        # operator's topology (packaging/rabbitmq) exists.
        consume.queue_declare(q, passive=True)
        consume.basic_qos(prefetch_count=self._prefetch)
        generation = self._generation

        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:  # noqa: ANN401
            self.inbox.put(
                Delivery(
                    generation,
                    method.delivery_tag,
                    bool(method.redelivered),
                    body,
                    getattr(props, "problem", None),
                    getattr(props, "too_large", None),
                )
            )
            self._on_delivery()

        def take() -> str | None:
            if self._pause.is_set() or not self._intake.is_set():
                return None
            tag: str = consume.basic_consume(q, on_message, auto_ack=False)
            return tag

        side = self._side_exchanges(conn)
        tag = take()
        self.connected.set()
        self.ever_connected.set()
        self.last_error = ""
        logger.info(
            "broker: connected to %s:%s vhost %s",
            self._params.host,
            self._params.port,
            self._params.virtual_host,
        )
        self._on_state(True, "")
        try:
            self._loop(conn, consume, publish, confirms, generation, (tag, take), side)
        finally:
            # What the broker confirmed stays confirmed, whatever ends the loop.
            if confirms.acked:
                self._outbox.mark_published(confirms.acked)

    @staticmethod
    def _select_confirms(conn: Any, channel: Any, confirms: Confirms) -> None:  # noqa: ANN401
        """Confirm mode with our own callback, so publishes need not wait.

        pika's ``BlockingChannel.confirm_delivery()`` makes each publish wait
        for its confirm (a round trip per message); the channel's underlying
        pika ``Channel`` takes a callback instead.
        """
        selected: list[bool] = []
        channel._impl.confirm_delivery(  # pika has no public async confirms
            ack_nack_callback=confirms.on_confirm,
            callback=lambda _frame: selected.append(True),
        )
        deadline = time.monotonic() + 30
        while not selected:
            if time.monotonic() > deadline:
                raise BrokerError("the broker did not answer confirm.select")
            conn.process_data_events(time_limit=0.05)

    def _loop(
        self,
        conn: Any,  # noqa: ANN401
        consume: Any,  # noqa: ANN401
        publish: Any,  # noqa: ANN401
        confirms: Confirms,
        generation: int,
        taking: tuple[str | None, Callable[[], str | None]],
        side: bool,
    ) -> None:
        tag, take = taking
        while not self._halt.is_set():
            self._wake.clear()
            if self._pause.is_set() and tag is not None:
                consume.basic_cancel(tag)
                tag = None
            elif tag is None:
                tag = take()  # the intake was held, and is open now
            self._do_acks(consume, generation)
            # One batch at a time: acks and deliveries are served between
            # batches, so a busy outbox never starves the intake.
            more = self._drain(publish, confirms)
            if side:
                self._drain_side(publish, confirms)
            idle = not more and not self._wake.is_set()
            # Returns early on data from the broker or on ``wake()``.
            conn.process_data_events(time_limit=_POLL_S if idle else 0)
        self._do_acks(consume, generation)

    def _do_acks(self, channel: Any, generation: int) -> None:  # noqa: ANN401
        while True:
            try:
                d, what = self._acks.get_nowait()
            except queue.Empty:
                return
            if d.generation != generation:
                continue
            if what == "ack":
                channel.basic_ack(d.tag)
            else:
                channel.basic_nack(d.tag, requeue=what == "requeue")

    def _drain(self, channel: Any, confirms: Confirms) -> bool:  # noqa: ANN401
        """Publish one batch of the outbox; True if more may be waiting.

        Publishes do not wait for their confirms (they arrive while the loop
        serves the broker); a message is marked published only once the
        broker confirmed it, and at most ``_IN_FLIGHT`` wait for that. New
        messages go out before the confirmed ones are marked (a commit): that
        write is not on the way of the next event.
        """
        room = min(_BATCH, _IN_FLIGHT - len(confirms.seqs))
        batch = []
        if room > 0:
            skip = set(confirms.seqs.values()).union(confirms.acked)
            pending = self._outbox.pending_events(room + len(skip))
            batch = [m for m in pending if m.seq not in skip][:room]
        for m in batch:
            props = pika.BasicProperties(
                content_type="application/json"
                if m.exchange == EVENTS_EXCHANGE
                else "application/octet-stream",
                delivery_mode=2,
                message_id=f"{self._node}:{m.seq}",
                headers=m.headers or None,
            )
            channel.basic_publish(m.exchange, m.routing_key, m.body, props)
            confirms.sent(m.seq)
        acked = confirms.take_acked()
        if acked:
            self._outbox.mark_published(acked)
        return len(batch) == _BATCH

    def _side_exchanges(self, conn: pika.BlockingConnection) -> bool:
        """True if the broker has the best-effort exchanges (passive check)."""
        for name in (NODES_EXCHANGE, LOGS_EXCHANGE):
            check = conn.channel()
            try:
                check.exchange_declare(name, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                logger.warning(
                    "broker: no exchange %s (older broker definitions):"
                    " node status and live logs are not sent",
                    name,
                )
                return False
            check.close()
        return True

    def _drain_side(self, channel: Any, confirms: Confirms) -> None:  # noqa: ANN401
        """Publish up to one batch of best-effort messages (lost on failure).

        They share the outbox's confirm-mode channel: each takes a delivery
        tag, whose confirm nobody waits for.
        """
        for _ in range(_BATCH):
            try:
                m = self._side.popleft()
            except IndexError:
                return
            props = pika.BasicProperties(
                content_type=m.content_type,
                delivery_mode=1,
                headers=m.headers or None,
            )
            channel.basic_publish(m.exchange, m.routing_key, m.body, props)
            confirms.sent(None)

    def _close(self) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except _LINK_ERRORS as e:
                logger.debug("broker: close: %s", describe(e))
        if was:
            self._on_state(False, self.last_error)
