"""The orchestrator's side of the wire: ``femd submit`` and ``femd watch``.

Owns publishing envelopes to ``femd.tasks`` and following
``femd.orchestrator.events``/``femd.orchestrator.results`` (the operator's
durable queues, see ``packaging/rabbitmq``): status events are printed and
logged, result chunks reassembled, checked against their sha256 and unpacked.
Runs where the signing happens, never on a data node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import msgspec
import pika
import pika.exceptions

from femd.broker import (
    TASKS_EXCHANGE,
    connection_parameters,
    describe,
)
from femd.config import OrchestratorConfig
from femd.envelope import decode_envelope
from femd.errors import BrokerError, StageOutError, cut
from femd.manifest import decode_manifest

__all__ = ["EVENTS_QUEUE", "RESULTS_QUEUE", "Watch", "submit"]

logger = logging.getLogger(__name__)

EVENTS_QUEUE: Final = "femd.orchestrator.events"
RESULTS_QUEUE: Final = "femd.orchestrator.results"
TERMINAL: Final = frozenset(
    {"rejected", "succeeded", "failed", "timed_out", "cancelled"}
)
_ERRORS: Final = (pika.exceptions.AMQPError, OSError)


def _connect(cfg: OrchestratorConfig) -> pika.BlockingConnection:
    params = connection_parameters(cfg.broker)
    try:
        return pika.BlockingConnection(params)
    except _ERRORS as e:
        raise BrokerError(f"broker {params.host}:{params.port}: {describe(e)}") from e


def submit(cfg: OrchestratorConfig, nodes: Iterable[str], envelope: bytes) -> str:
    """Publish *envelope* to each node's queue with publisher confirms.

    The envelope is decoded first (never publish garbage); its signatures are
    the nodes' business. Returns the task id.

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
        return manifest.id
    except _ERRORS as e:
        raise BrokerError(f"submit: {describe(e)}") from e
    finally:
        try:
            conn.close()
        except _ERRORS:
            logger.debug("submit: close failed", exc_info=True)


class _Outputs(msgspec.Struct):
    total: int
    sha256: str
    parts: dict[int, bytes]


class Watch:
    """Follow status events and collect outputs into ``results_dir``.

    Layout: ``events.jsonl`` (every event, de-duplicated by node and seq) and
    ``<node>/<task_id>/`` (the unpacked, sha256-verified outputs).
    """

    def __init__(
        self,
        cfg: OrchestratorConfig,
        *,
        task_id: str | None = None,
        nodes: Iterable[str] = (),
        on_event: Callable[[dict[str, Any]], None] | None = None,
        max_output_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        """Prepare; nothing connects before ``run()``."""
        self.cfg = cfg
        self.task_id = task_id
        self.nodes = set(nodes)
        self.on_event = on_event or (lambda e: None)
        self.max_output_bytes = max_output_bytes
        self.results = Path(cfg.results_dir)
        self.seen: set[tuple[str, int]] = set()
        self.terminal: dict[tuple[str, str], dict[str, Any]] = {}
        self.pending: dict[tuple[str, str], _Outputs] = {}
        self.collected: set[tuple[str, str]] = set()
        self.errors: list[str] = []

    # -- completion ---------------------------------------------------------

    def _wanted(self, task: str) -> bool:
        return self.task_id is None or task == self.task_id

    def done(self) -> bool:
        """True when --task was given and every expected node finished and delivered."""
        if self.task_id is None:
            return False
        finished = {n for (n, t) in self.terminal if t == self.task_id}
        if self.nodes and not self.nodes <= finished:
            return False
        if not finished:
            return False
        for (n, t), ev in self.terminal.items():
            if t == self.task_id and ev.get("outputs") and (n, t) not in self.collected:
                return False
        return True

    # -- handlers -----------------------------------------------------------

    def _on_status(self, body: bytes) -> None:
        try:
            event = json.loads(body)
            node, task, state, seq = (
                str(event["node"]),
                str(event["task_id"]),
                str(event["state"]),
                int(event["seq"]),
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("watch: ignoring a malformed status event")
            return
        if (node, seq) in self.seen:
            return
        self.seen.add((node, seq))
        self.results.mkdir(parents=True, exist_ok=True)
        with (self.results / "events.jsonl").open("a") as f:
            f.write(json.dumps(event, sort_keys=True) + "\n")
        if not self._wanted(task):
            return
        if state in TERMINAL:
            self.terminal[(node, task)] = event
            outputs = event.get("outputs")
            if isinstance(outputs, dict) and (node, task) in self.pending:
                self._try_finish(node, task)
        self.on_event(event)

    def _on_chunk(self, routing_key: str, headers: dict[str, Any], body: bytes) -> None:
        try:
            node, task = routing_key.rsplit(".", 1)
            index, total = int(headers["index"]), int(headers["total"])
            sha = str(headers["sha256"])
        except (ValueError, KeyError, TypeError):
            logger.warning(
                "watch: ignoring a malformed result chunk (%s)", cut(routing_key)
            )
            return
        if (node, task) in self.collected or not self._wanted(task):
            return
        out = self.pending.setdefault((node, task), _Outputs(total, sha, {}))
        if out.total != total or out.sha256 != sha or not 0 <= index < total:
            self.errors.append(f"{node}/{task}: inconsistent result chunks")
            return
        out.parts[index] = body
        self._try_finish(node, task)

    def _try_finish(self, node: str, task: str) -> None:
        from femd.stageout import unpack_outputs

        out = self.pending.get((node, task))
        if out is None or len(out.parts) < out.total:
            return
        event = self.terminal.get((node, task))
        data = b"".join(out.parts[i] for i in range(out.total))
        digest = hashlib.sha256(data).hexdigest()
        announced = (event or {}).get("outputs", {}).get("sha256", out.sha256)
        if digest != out.sha256 or digest != announced:
            self.errors.append(f"{node}/{task}: outputs sha256 mismatch, discarded")
            del self.pending[(node, task)]
            return
        dest = self.results / node / task
        archive = self.results / node / f"{task}.tar.gz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(data)
        try:
            unpack_outputs(archive, dest, max_bytes=self.max_output_bytes)
        except StageOutError as e:
            self.errors.append(f"{node}/{task}: {e}")
        del self.pending[(node, task)]
        self.collected.add((node, task))

    # -- loop ---------------------------------------------------------------

    def run(self, timeout_s: float | None = None) -> bool:
        """Consume until done (``--task``) or *timeout_s*; True when done.

        Raises:
            BrokerError: the broker is unreachable or refused us.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        conn = _connect(self.cfg)
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=200)

            def status(chan: Any, method: Any, _p: Any, body: bytes) -> None:  # noqa: ANN401
                self._on_status(body)
                chan.basic_ack(method.delivery_tag)

            def chunk(chan: Any, method: Any, props: Any, body: bytes) -> None:  # noqa: ANN401
                self._on_chunk(method.routing_key, props.headers or {}, body)
                chan.basic_ack(method.delivery_tag)

            ch.basic_consume(EVENTS_QUEUE, status)
            ch.basic_consume(RESULTS_QUEUE, chunk)
            while not self.done():
                if deadline is not None and time.monotonic() > deadline:
                    return False
                conn.process_data_events(time_limit=0.2)
            return True
        except _ERRORS as e:
            raise BrokerError(f"watch: {describe(e)}") from e
        finally:
            try:
                if conn.is_open:
                    conn.close()
            except _ERRORS:
                logger.debug("watch: close failed", exc_info=True)
