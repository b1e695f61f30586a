"""Fakes that implement femd's real Protocols (STYLE rule 11), for tests only.

``FakeLauncher`` implements ``femd.launchers.Launcher`` and its handles
``femd.launchers.Handle``: it runs nothing, writes the outputs it is given
into the task's output directory and ends the task as told. ``FakeLauncher.factory``
has the ``LauncherFactory`` signature, so a test can put it in the registry
(``femd.launchers.LAUNCHERS``) and run a task through the real agent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal

from femd.launchers import Capabilities, LauncherProfile, LaunchSpec, Outcome

__all__ = ["ENFORCES_ALL", "FakeHandle", "FakeLauncher"]

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

    @classmethod
    def factory(
        cls, profile: LauncherProfile, *, state_dir: Path, podman_socket: str | None
    ) -> FakeLauncher:
        """The registry's signature: build one, and remember it for the test."""
        del profile, state_dir, podman_socket
        launcher = cls(outputs={"result.txt": b"42\n"})
        cls.built.append(launcher)
        return launcher

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
