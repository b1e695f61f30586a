"""Fixtures for the real rootless-podman tests of the ``podman`` launcher.

- ``podman_service`` (session): a :class:`testbed.podman.PodmanService` run as
  ``femd-podman`` (created with its subordinate ids by
  ``scripts/setup-podman-user.sh`` when missing) on a private socket.
- ``busybox_image`` (session): the digest reference of the busybox test image,
  imported locally (nothing can be pulled from the internet here).
- ``podman_box`` (function): a :class:`PodmanBox`: a scratch root closed to
  "other" (mode 0750, group ``femd-podman``, like the agent's work dir), a stand-in
  for the agent's state dir holding a secret, and two real launchers:
  ``launcher`` runs tasks although this host cannot enforce memory/cpu limits
  (``testbed.podman.unenforced_launcher``), ``strict`` is what the agent builds.

No fakes: every run is a real rootless container. When podman is unusable the
fixtures skip, unless ``CI=true`` or ``FEMD_TEST_REQUIRE`` names ``podman`` (or
``all``): then they fail.
"""

from __future__ import annotations

import grp
import os
import secrets
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from podman import PodmanClient

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # testbed/ is not installed; it lives at the root
    sys.path.insert(0, str(REPO))

from femd.config import PodmanConfig  # noqa: E402
from femd.launchers import (  # noqa: E402
    LauncherProfile,
    LaunchSpec,
    Limits,
    Mount,
    Outcome,
    PodmanSettings,
    environment,
)
from femd.launchers.podman import LABEL_TASK, PodmanHandle, PodmanLauncher  # noqa: E402
from testbed.podman import (  # noqa: E402
    PodmanService,
    PodmanServiceError,
    podman_available,
    unenforced_launcher,
)
from tests.backends import unavailable  # noqa: E402

PODMAN_USER = "femd-podman"
RUN = secrets.token_hex(3)  # task ids of this session start with pt-<RUN>-


def _unusable(message: str) -> None:
    unavailable("podman", message)


def profile(**podman: Any) -> LauncherProfile:
    """A profile with a podman section (settings overridable)."""
    return LauncherProfile(
        api_version="femd/v1",
        kind="LauncherProfile",
        name="default",
        podman=PodmanSettings(**podman),
    )


@pytest.fixture(scope="session")
def podman_service() -> Iterator[PodmanService]:
    why = podman_available()
    if why is not None:
        _unusable(f"rootless podman unavailable: {why}")
    service = PodmanService(PODMAN_USER)
    try:
        service.start()
    except PodmanServiceError as e:
        _unusable(f"rootless podman unavailable: {e}")
    try:
        yield service
    finally:
        _remove_session_containers(service.url)
        service.stop()


def _remove_session_containers(url: str) -> None:
    with PodmanClient(base_url=url) as client:
        for c in client.containers.list(all=True, filters=[f"label={LABEL_TASK}"]):
            if str(c.labels.get(LABEL_TASK, "")).startswith(f"pt-{RUN}-"):
                c.remove(force=True)


@pytest.fixture(scope="session")
def busybox_image(podman_service: PodmanService) -> str:
    return podman_service.build_busybox_image()


class PodmanBox:
    """A scratch root closed to "other", an agent state stand-in, real launchers."""

    def __init__(self, service: PodmanService, image: str, root: Path) -> None:
        self.service = service
        self.image = image
        self.root = root
        self.state_dir = root / "state"  # the agent's state dir, stand-in
        self.state_dir.mkdir(mode=0o755)
        self.secret = self.state_dir / "state.sqlite"
        self.secret.write_text("agent secret\n")
        self.secret.chmod(0o644)  # readable by anyone: only the sandbox hides it
        self.profile = profile()
        self.launcher = self.make_launcher(unenforced=True)
        self.strict = self.make_launcher()
        self._box = secrets.token_hex(2)
        self._count = 0

    def make_launcher(
        self, *, unenforced: bool = False, settings: LauncherProfile | None = None
    ) -> PodmanLauncher:
        """A new launcher instance (as a restarted agent would build it).

        *unenforced*: it runs tasks without the memory/cpu limits this host
        cannot enforce (test-only; see ``testbed.podman``).
        """
        build = unenforced_launcher if unenforced else PodmanLauncher
        env = environment(
            "podman", self.state_dir, {"podman": PodmanConfig(socket=self.service.url)}
        )
        return build(settings or self.profile, env)

    def task_id(self) -> str:
        self._count += 1
        return f"pt-{RUN}-{self._box}-{self._count}"

    def _new_dir(self, kind: str, mode: int) -> Path:
        self._count += 1
        path = self.root / f"{kind}-{self._count}"
        path.mkdir()
        path.chmod(mode)
        return path

    def input_dir(self, files: dict[str, str] | None = None) -> Path:
        """A root-owned, world-readable input directory holding *files*."""
        path = self._new_dir("in", 0o755)
        for name, content in (files or {}).items():
            (path / name).write_text(content)
            (path / name).chmod(0o644)
        return path

    def output_dir(self) -> Path:
        """An empty output directory, as the agent creates it (0755, root)."""
        return self._new_dir("out", 0o755)

    def spec(
        self,
        script: str = "",
        *,
        argv: tuple[str, ...] | None = None,
        mounts: tuple[Mount, ...] = (),
        env: tuple[tuple[str, str], ...] = (),
        output: Path | None = None,
        cpus: float = 1,
        memory_mb: int = 256,
        timeout_s: int = 30,
        pids: int = 64,
        egress: tuple[str, ...] | None = None,
        listen: tuple[int, ...] = (),
        ingress_peers: tuple[str, ...] = (),
        log_max_bytes: int = 1 << 20,
        output_max_bytes: int = 1 << 20,
        workdir: str | None = None,
        task_id: str | None = None,
        image: str | None = None,
        launcher_profile: LauncherProfile | None = None,
    ) -> LaunchSpec:
        return LaunchSpec(
            task_id=task_id or self.task_id(),
            launcher="podman",
            profile=launcher_profile or self.profile,
            argv=argv or ("/bin/sh", "-c", textwrap.dedent(script)),
            env=env,
            image=image or self.image,
            mounts=mounts,
            workdir=workdir,
            output_dir=str(output or self.output_dir()),
            limits=Limits(
                cpus=cpus, memory_mb=memory_mb, timeout_s=timeout_s, pids=pids
            ),
            egress=egress,
            listen=listen,
            ingress_peers=ingress_peers,
            log_max_bytes=log_max_bytes,
            output_max_bytes=output_max_bytes,
        )

    def launch(self, script: str, **kw: Any) -> tuple[PodmanHandle, LaunchSpec]:
        spec = self.spec(script, **kw)
        return self.launcher.launch(spec), spec

    def run(self, script: str, **kw: Any) -> tuple[Outcome, Path, bytes]:
        """Run *script* with ``/bin/sh -c`` to the end: (outcome, output dir, logs)."""
        handle, spec = self.launch(script, **kw)
        outcome = handle.wait(spec.limits.timeout_s + 30)
        assert outcome is not None, "the launcher did not end the task"
        return outcome, Path(spec.output_dir), b"".join(handle.logs())

    def containers(self, task_id: str) -> list[str]:
        """Names of the containers labelled with *task_id* (any state)."""
        with PodmanClient(base_url=self.service.url) as client:
            found = client.containers.list(
                all=True, filters=[f"label={LABEL_TASK}={task_id}"]
            )
            return [str(c.name) for c in found]

    def wait_log(self, task_id: str, text: str, timeout_s: float = 30) -> None:
        """Poll *task_id*'s container log until it holds *text*."""
        end = time.monotonic() + timeout_s
        with PodmanClient(base_url=self.service.url) as client:
            while time.monotonic() < end:
                found = client.containers.list(
                    all=True, filters=[f"label={LABEL_TASK}={task_id}"]
                )
                logs = b"".join(found[0].logs(stream=False)) if found else b""
                if text.encode() in logs:
                    return
                time.sleep(0.1)
        raise AssertionError(f"{task_id} never logged {text!r}")

    def status(self, task_id: str) -> str:
        """The status of *task_id*'s container now ("" if there is none)."""
        with PodmanClient(base_url=self.service.url) as client:
            found = client.containers.list(
                all=True, filters=[f"label={LABEL_TASK}={task_id}"]
            )
            # A list entry's "State" is the status string itself.
            return str(found[0].attrs.get("State", "")) if found else ""

    def wait_status(self, task_id: str, status: str, timeout_s: float = 20) -> None:
        """Poll podman until *task_id*'s container has *status*."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.status(task_id) == status:
                return
            time.sleep(0.05)
        raise AssertionError(f"container of {task_id} never reached {status}")


@pytest.fixture
def podman_box(
    podman_service: PodmanService, busybox_image: str
) -> Iterator[PodmanBox]:
    root = Path(tempfile.mkdtemp(prefix="femd-ptest-", dir="/tmp"))
    try:
        # Like the agent's work dir: the podman user may enter (group), nobody else.
        os.chown(root, 0, grp.getgrnam(PODMAN_USER).gr_gid)
        root.chmod(0o750)
        yield PodmanBox(podman_service, busybox_image, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
