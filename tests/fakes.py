"""Fakes that implement femd's real Protocols (STYLE rule 11), for tests only.

``FakeLauncher`` implements ``femd.launchers.Launcher`` and its handles
``femd.launchers.Handle``: it runs nothing, writes the outputs it is given
into the task's output directory and ends the task as told.

``REGISTRATION`` makes it a launcher kind of its own, ``fake``, the way a new
launcher joins femd: its factory, its profile section (``FakeSettings``) and
its spec checks, in one registry entry. A test adds that one line to
``femd.launchers.registry.LAUNCHERS`` and nothing else: manifests and
policies then accept ``fake``, profiles a ``fake:`` section, and the real
agent runs tasks with it.

``FakeLink`` implements ``femd.messages.Link`` (the broker link as the agent
uses it) in memory: a test delivers bodies, and the link records every
settlement (ack/reject) and every outbox message it "published" (each one
confirmed at once, so marked published in the outbox), in order. The agent
takes it as its link factory: ``Agent(config, link=FakeLink)``.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import msgspec

from femd.config import BrokerConfig
from femd.decision import Reason, Rule
from femd.events import EVENTS_EXCHANGE
from femd.launchers import (
    Capabilities,
    LauncherEnv,
    LauncherProfile,
    LaunchSpec,
    Outcome,
    Registration,
)
from femd.messages import Delivery, Outbox, SideMessage

__all__ = [
    "ENFORCES_ALL",
    "REGISTRATION",
    "FakeHandle",
    "FakeLauncher",
    "FakeLink",
    "FakeSettings",
    "Published",
    "RegisteredFake",
]

ENFORCES_ALL = {
    "available": True,
    "memory_limit": True,
    "cpu_limit": True,
    "pids_limit": True,
    "egress": True,
    "ingress": True,
}


class FakeHandle:
    """A task that ends as its launcher says, at once or when cancelled."""

    def __init__(
        self,
        spec: LaunchSpec,
        state: Literal["succeeded", "failed", "timed_out", "cancelled"],
        log: bytes,
        *,
        hold: bool = False,
    ) -> None:
        self.task_id = spec.task_id
        self.spec = spec
        self._state = state
        self._log = log
        self._started = datetime.now(UTC)
        self._done = threading.Event()
        if not hold:
            self._done.set()

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        if not self._done.wait(timeout_s):
            return None
        return Outcome(
            state=self._state,
            exit_code=0 if self._state == "succeeded" else 1,
            started_at=self._started,
            finished_at=datetime.now(UTC),
            log_tail=self._log.decode(errors="replace")[-4096:],
        )

    def cancel(self, grace_s: float = 10.0) -> None:
        del grace_s
        self._state = "cancelled"
        self._done.set()

    def logs(self) -> Iterator[bytes]:
        yield self._log


class FakeLauncher:
    """Implements the Launcher Protocol; launch() does what it is told.

    *outputs* (relative path -> bytes) are written into the spec's output
    directory; *error* is raised by ``launch()``; *hold* keeps tasks running
    until cancelled. ``launched`` records every spec.
    """

    name: ClassVar[str] = "process"
    built: ClassVar[list[FakeLauncher]] = []

    def __init__(
        self,
        capabilities: Capabilities | None = None,
        error: BaseException | None = None,
        *,
        outputs: Mapping[str, bytes] | None = None,
        state: Literal["succeeded", "failed", "timed_out", "cancelled"] = "succeeded",
        log: bytes = b"fake launcher ran\n",
        hold: bool = False,
    ) -> None:
        self.capabilities = capabilities or Capabilities(
            launcher=self.name, **ENFORCES_ALL
        )
        self.error = error
        self.outputs = dict(outputs or {})
        self.state = state
        self.log = log
        self.hold = hold
        self.launched: list[LaunchSpec] = []
        self.handles: dict[str, FakeHandle] = {}

    def probe(self) -> Capabilities:
        return self.capabilities

    def launch(self, spec: LaunchSpec) -> FakeHandle:
        self.launched.append(spec)
        if self.error is not None:
            raise self.error
        for rel, data in self.outputs.items():
            path = Path(spec.output_dir) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        handle = FakeHandle(spec, self.state, self.log, hold=self.hold)
        self.handles[spec.task_id] = handle
        return handle

    def adopt(self, task_id: str) -> FakeHandle | None:
        return self.handles.get(task_id)


class FakeSettings(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """The ``fake:`` section of a launcher profile (declared by the fake alone)."""

    outputs: dict[str, str] = msgspec.field(default_factory=dict)
    """Files (relative path -> text) every task of this profile outputs."""
    reserved: tuple[str, ...] = ("/fake",)
    """Mount targets the fake keeps for itself (its spec check refuses them)."""
    hold: bool = False
    """Tasks of this profile run until cancelled."""


class RegisteredFake(FakeLauncher):
    """The fake as the ``fake`` launcher, built from its own profile section."""

    name: ClassVar[str] = "fake"
    built: ClassVar[list[FakeLauncher]] = []

    @classmethod
    def factory(cls, profile: LauncherProfile, env: LauncherEnv) -> RegisteredFake:
        """The registry's signature: build one, and remember it for the test."""
        settings = profile.section(cls.name)
        assert isinstance(settings, FakeSettings), settings
        env.state_dir.mkdir(parents=True, exist_ok=True)
        outputs = {k: v.encode() for k, v in settings.outputs.items()}
        launcher = cls(outputs=outputs, hold=settings.hold)
        launcher.env = env
        cls.built.append(launcher)
        return launcher

    env: LauncherEnv | None = None


def _fake_reasons(spec: LaunchSpec) -> list[Reason]:
    settings = spec.profile.section(RegisteredFake.name)
    reserved = settings.reserved if isinstance(settings, FakeSettings) else ()
    targets = [m.target for m in spec.mounts] + [spec.output_target]
    return [
        Reason(Rule.MOUNT_RESERVED, f"mount target {t!r} is reserved by the fake")
        for t in targets
        if t in reserved
    ]


# The one registry line a test adds: ``"fake": REGISTRATION``.
REGISTRATION = Registration(
    factory=RegisteredFake.factory, settings=FakeSettings, spec_reasons=_fake_reasons
)


# ---------------------------------------------------------------------------
# the broker link


class Published(NamedTuple):
    """One outbox message as the fake link published (and confirmed) it."""

    seq: int
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] | None


class FakeLink:
    """Implements ``femd.messages.Link`` in memory; its constructor is a LinkFactory.

    ``deliver()`` puts a body in ``inbox`` as the broker would. ``settled``
    records ``(delivery, "ack" | "reject")`` in order (a settlement of an
    older generation is dropped, as the real link drops it); ``on_settle``,
    if set, is called with each before it is recorded (a test checks there
    what is durable at that moment). Every ``wake()`` publishes the outbox's
    pending messages into ``published``, in ``seq`` order, and marks them
    published (a broker that confirms at once). ``side`` records best-effort
    messages. ``wait_for()`` waits for a condition on all this.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        node: str,
        outbox: Outbox,
        *,
        prefetch: int,
        max_body: int,
        on_state: Callable[[bool, str], None] | None = None,
        on_delivery: Callable[[], None] | None = None,
    ) -> None:
        del cfg, prefetch
        self.node = node
        self.max_body = max_body
        self.outbox = outbox
        self._on_state = on_state or (lambda up, why: None)
        self._on_delivery = on_delivery or (lambda: None)
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.connected = threading.Event()
        self.ever_connected = threading.Event()
        self.last_error = ""
        self.on_settle: Callable[[Delivery, str], None] | None = None
        self.settled: list[tuple[Delivery, str]] = []
        self.published: list[Published] = []
        self.side: list[SideMessage] = []
        self.paused = False
        self.intake_open = True
        self.stopped = False
        self._generation = 1
        self._tag = 0
        self._changed = threading.Condition()

    # -- femd.messages.Link ------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._generation

    def start(self) -> None:
        self.connected.set()
        self.ever_connected.set()
        self._on_state(True, "")

    def hold_intake(self) -> None:
        self.intake_open = False

    def open_intake(self) -> None:
        self.intake_open = True

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, "ack")

    def reject(self, delivery: Delivery) -> None:
        self._settle(delivery, "reject")

    def publish_soon(self, message: SideMessage) -> None:
        with self._changed:
            self.side.append(message)
            self._changed.notify_all()

    def wake(self) -> None:
        """Publish what the outbox holds, each message once, in seq order."""
        with self._changed:
            if not self.connected.is_set():
                return
            sent = [
                Published(m.seq, m.exchange, m.routing_key, m.body, m.headers)
                for m in self.outbox.pending_events(1000)
            ]
            if sent:
                self.published.extend(sent)
                self.outbox.mark_published([m.seq for m in sent])
                self._changed.notify_all()

    def pause_consuming(self) -> None:
        self.paused = True

    def stop(self, flush_s: float = 5.0) -> None:
        del flush_s
        self.wake()
        with self._changed:
            self.stopped = True
            self.connected.clear()
            self._changed.notify_all()

    # -- the broker's side, for tests ------------------------------------------------

    def deliver(
        self,
        body: bytes,
        *,
        redelivered: bool = False,
        problem: str | None = None,
    ) -> Delivery:
        """Put *body* in the inbox (cut as the real link cuts an oversized one).

        A link whose intake is held takes nothing: delivering then is a bug.
        """
        assert self.intake_open, "a delivery to a link whose intake is held"
        with self._changed:
            self._tag += 1
            size = len(body)
            d = Delivery(
                generation=self._generation,
                tag=self._tag,
                redelivered=redelivered,
                body=body if size <= self.max_body else b"",
                problem=problem,
                too_large=size if size > self.max_body else None,
            )
        self.inbox.put(d)
        self._on_delivery()
        return d

    def wait_for(
        self, what: str, predicate: Callable[[], object], timeout_s: float
    ) -> None:
        """Wait until *predicate()* (checked at each change) holds, or fail."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout_s):
                raise AssertionError(f"fake link: timed out waiting for {what}")

    def events(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """The status events published so far (of *task_id*, if given), in order."""
        with self._changed:
            sent = list(self.published)
        out = [json.loads(m.body) for m in sent if m.exchange == EVENTS_EXCHANGE]
        return [e for e in out if task_id is None or e.get("task_id") == task_id]

    def _settle(self, delivery: Delivery, what: str) -> None:
        if self.on_settle is not None:
            self.on_settle(delivery, what)
        with self._changed:
            if delivery.generation == self._generation:
                self.settled.append((delivery, what))
            self._changed.notify_all()
