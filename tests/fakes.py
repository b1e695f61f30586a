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
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal

import msgspec

from femd.decision import Reason, Rule
from femd.launchers import (
    Capabilities,
    LauncherEnv,
    LauncherProfile,
    LaunchSpec,
    Outcome,
    Registration,
)

__all__ = [
    "ENFORCES_ALL",
    "REGISTRATION",
    "FakeHandle",
    "FakeLauncher",
    "FakeSettings",
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
        launcher = cls(outputs=outputs)
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
