"""A small Python API for orchestrators: submit, watch, fetch outputs, nodes, cancel.

``Client`` is what ``femd submit/watch/cancel/nodes/tasks --orchestrator``
use, so a FEM orchestrator or a notebook can drive femd without shelling out
(see ``docs/orchestrator.md``)::

    client = Client(load_orchestrator_config(Path("orchestrator.yaml")))
    task_id = client.submit(envelope, ["fdn-01", "fdn-02"])
    watch = client.watch(task_id)
    for item in watch.follow(timeout_s=3600):
        print(item)                # StoredEvent, LogBatch or OutputStatus
    print(watch.done, watch.errors, client.outputs("fdn-01", task_id))

Everything received goes through the durable inbox (``femd.inbox``) before it
is acked, so any number of clients (processes) may run at once on the same
inbox and none loses or hides what another one needs. Owns no wire format
(``femd.orchestrator``) and no storage (``femd.inbox``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from femd.config import OrchestratorConfig
from femd.envelope import encode_envelope, sign
from femd.errors import InputError
from femd.events import TERMINAL_STATES
from femd.inbox import (
    EventGap,
    Inbox,
    LogBatch,
    OutputStatus,
    StoredEvent,
    TaskSummary,
)
from femd.manifest import Cancel, encode_manifest
from femd.orchestrator import Receiver, submit

__all__ = ["Client", "NodeView", "Watch", "WatchItem"]

WatchItem = StoredEvent | LogBatch | OutputStatus | EventGap
_CANCEL_VALID: Final = timedelta(hours=1)
# How long a hole in a node's event numbering may stay open before a watch
# calls it lost: a delivery the broker handed back comes again within it.
GAP_GRACE_S: Final = 15.0


class NodeView(msgspec.Struct, frozen=True):
    """A node as the orchestrator sees it: its last status and whether it looks down."""

    node: str
    age_s: float
    down: bool
    status: dict[str, object]


class Client:
    """The orchestrator's handle on femd (one per thread).

    Args:
        cfg: the orchestrator config (broker identity, inbox directory).
        inbox: an inbox directory instead of ``cfg.results_dir``.

    Raises:
        StateError: the inbox cannot be opened.
        BrokerError: the broker configuration is unusable.
    """

    def __init__(self, cfg: OrchestratorConfig, *, inbox: Path | None = None) -> None:
        """Open the inbox; nothing connects before it is needed."""
        self.cfg = cfg
        self.inbox = Inbox(
            inbox or Path(cfg.results_dir), max_output_bytes=cfg.max_output_bytes
        )
        self.receiver = Receiver(cfg, self.inbox)

    def close(self) -> None:
        """Close the broker connection and the inbox."""
        self.receiver.close()
        self.inbox.close()

    def __enter__(self) -> Client:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close."""
        self.close()

    # -- sending ---------------------------------------------------------------

    def submit(self, envelope: bytes, nodes: Sequence[str]) -> str:
        """Publish a signed envelope to *nodes*; return its task id.

        Raises:
            EnvelopeError: the envelope is malformed.
            ManifestError: its payload is not a manifest.
            BrokerError: the broker refused or has no queue for a node.
        """
        manifest = submit(self.cfg, nodes, envelope)
        self.inbox.record_submitted(
            manifest.id, type(manifest).__name__, manifest.project, list(nodes)
        )
        return manifest.id

    def cancel(
        self,
        target: str,
        nodes: Sequence[str],
        keys: Sequence[Ed25519PrivateKey],
        *,
        project: str | None = None,
        issuer: str | None = None,
    ) -> str:
        """Sign a ``Cancel`` of *target* with *keys* and submit it to *nodes*.

        The project is the one *target* was submitted under from this inbox,
        unless *project* names it. Returns the cancel's own id.

        Raises:
            InputError: no key, no node, or the project is unknown.
            BrokerError: the broker refused.
        """
        if not keys:
            raise InputError("cancel: at least one --key is needed")
        if not nodes:
            raise InputError("cancel: at least one --node is needed")
        known = self.inbox.submitted(target)
        project = project or (known[0] if known else None)
        if project is None:
            raise InputError(
                f"cancel: task {target} was not submitted from this inbox;"
                " give --project"
            )
        now = datetime.now(UTC).replace(microsecond=0)
        try:
            manifest = msgspec.convert(
                {
                    "apiVersion": "femd/v1",
                    "kind": "Cancel",
                    "id": f"cancel-{uuid.uuid4()}",
                    "project": project,
                    "target": target,
                    "issued_at": now - timedelta(minutes=1),
                    "expires_at": now + _CANCEL_VALID,
                    "nodes": list(nodes),
                    "issuer": issuer,
                },
                Cancel,
                builtin_types=(datetime,),
            )
        except msgspec.ValidationError as e:
            raise InputError(f"cancel: {e}") from e
        envelope = encode_envelope(sign(encode_manifest(manifest), list(keys)))
        return self.submit(envelope, nodes)

    # -- receiving ---------------------------------------------------------------

    def receive(self, seconds: float) -> None:
        """Take what the broker holds for us into the inbox for *seconds*.

        Raises:
            StateError: the inbox cannot be written.
        """
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.receiver.pump(min(0.2, left))

    def watch(
        self,
        task_id: str | None = None,
        *,
        nodes: Iterable[str] = (),
        logs: bool = False,
        gap_grace_s: float = GAP_GRACE_S,
    ) -> Watch:
        """Follow one task (or, without *task_id*, everything new)."""
        return Watch(self, task_id, nodes=nodes, logs=logs, gap_grace_s=gap_grace_s)

    def outputs(self, node: str, task_id: str) -> OutputStatus | None:
        """Where *task_id*'s outputs from *node* stand (``path`` once verified)."""
        return self.inbox.output(node, task_id)

    def tasks(self) -> list[TaskSummary]:
        """Every task on every node the inbox knows, newest first."""
        return self.inbox.tasks()

    def nodes(self, *, now: datetime | None = None) -> list[NodeView]:
        """Every node that sent its status, with its age and whether it looks down.

        A node looks down once it said it is stopping, or after three of its
        own status intervals (``node_down_after_s`` if it states none) of
        silence.
        """
        now = now or datetime.now(UTC)
        views = []
        for seen in self.inbox.nodes():
            age = max(0.0, (now - seen.seen_at).total_seconds())
            interval = seen.body.get("interval_s")
            limit = (
                3 * float(interval)
                if isinstance(interval, int | float) and interval > 0
                else self.cfg.node_down_after_s
            )
            down = seen.body.get("state") == "stopping" or age > limit
            views.append(NodeView(seen.node, age, down, seen.body))
        return views


class Watch:
    """Follows the inbox (fed by this client's receiver) for one task or all.

    Besides events, log batches and outputs it yields an ``EventGap`` for
    each hole in a (watched) node's event numbering that stayed open
    *gap_grace_s*: status events lost between the node and the inbox, whose
    tasks may never be seen to end. ``lost`` keeps them.
    """

    def __init__(
        self,
        client: Client,
        task_id: str | None,
        *,
        nodes: Iterable[str] = (),
        logs: bool = False,
        gap_grace_s: float = GAP_GRACE_S,
    ) -> None:
        """Start at the task's first event (or, for all tasks, at what is new)."""
        self.client = client
        self.task_id = task_id
        self.logs = logs
        inbox = client.inbox
        self.nodes = set(nodes)
        if task_id is not None and not self.nodes:
            known = inbox.submitted(task_id)
            self.nodes = set(known[1]) if known else set()
        if task_id is None:
            self._after_event, self._after_log = inbox.last_ids()
        else:
            self._after_event = self._after_log = 0
        self.terminal: dict[str, StoredEvent] = {}
        self.reported: set[tuple[str, str]] = set()
        self.errors: list[str] = []
        self.gap_grace_s = gap_grace_s
        self.lost: list[EventGap] = []

    @property
    def done(self) -> bool:
        """For one task: every expected node ended and its outputs are settled."""
        if self.task_id is None or not self.terminal:
            return False
        if self.nodes and not self.nodes <= set(self.terminal):
            return False
        return all(
            (node, self.task_id) in self.reported
            for node, ev in self.terminal.items()
            if isinstance(ev.body.get("outputs"), dict)
        )

    def _new(self) -> Iterator[WatchItem]:
        inbox = self.client.inbox
        for ev in inbox.events(self.task_id, self._after_event):
            self._after_event = ev.id
            if ev.state in TERMINAL_STATES and self.task_id is not None:
                self.terminal[ev.node] = ev
            yield ev
        if self.logs:
            for batch in inbox.logs(self.task_id, self._after_log):
                self._after_log = batch.id
                yield batch
        for node, ev in self.terminal.items():
            key = (node, ev.task_id)
            if key in self.reported or not isinstance(ev.body.get("outputs"), dict):
                continue
            status = inbox.output(node, ev.task_id)
            if status is not None and status.status in ("complete", "failed"):
                self.reported.add(key)
                if status.status == "failed":
                    self.errors.append(
                        f"{node}/{ev.task_id}: outputs refused: {status.error}"
                    )
                yield status
        yield from self._gaps()

    def _gaps(self) -> Iterator[EventGap]:
        now = datetime.now(UTC)
        for gap in self.client.inbox.gaps():
            if self.nodes and gap.node not in self.nodes:
                continue
            if (now - gap.opened_at).total_seconds() < self.gap_grace_s:
                continue
            if any(g.node == gap.node and g.first <= gap.first and gap.last <= g.last
                   for g in self.lost):  # fmt: skip
                continue  # reported (a late event may have split it since)
            self.lost.append(gap)
            yield gap

    def follow(self, timeout_s: float | None = None) -> Iterator[WatchItem]:
        """Yield what arrives until ``done`` (one task) or *timeout_s* passes.

        Raises:
            StateError: the inbox cannot be written.
            BrokerError: the broker configuration is unusable.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            yield from self._new()
            if self.done:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            self.client.receiver.pump(0.2)
