"""The podman launcher, built only once its service socket exists.

An agent on a host without a podman service still builds a podman launcher
for every profile with a ``podman`` section, and probes it at start and on
each reload. The real one (``femd.launchers.podman``) imports podman-py and
requests: ~16 MB and ~90 ms that such an agent would carry for nothing.
``DeferredPodmanLauncher`` answers with a ``stat()`` while the socket is not
there, and builds the real launcher (which then does every check itself) on
the first probe, launch or adoption that finds it. Owns nothing else.
"""

from __future__ import annotations

import os
import stat
from typing import ClassVar

from femd.errors import LauncherUnavailableError
from femd.launchers import Capabilities, Handle, Launcher, LauncherEnv, LaunchSpec
from femd.launchers.profile import LauncherProfile
from femd.model import TaskId

__all__ = ["DeferredPodmanLauncher"]


def _missing(url: str) -> str | None:
    """Why *url* cannot be a podman service yet (no socket file), or None."""
    if not url:
        return "no podman socket configured"
    if not url.startswith("unix://"):
        return None  # tcp/ssh: only podman-py can tell
    path = url[len("unix://") :]
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"podman service {url}: cannot connect: {e.strerror or e}"
    if not stat.S_ISSOCK(mode):
        return f"podman service {url}: not a socket"
    return None


class DeferredPodmanLauncher:
    """A ``Launcher`` that stands in for ``PodmanLauncher`` until it can exist."""

    name: ClassVar[str] = "podman"

    def __init__(self, profile: LauncherProfile, env: LauncherEnv) -> None:
        """Keep the construction input; import nothing yet.

        ``env.config``: the ``podman`` section of femd.yaml (its ``socket``).
        """
        self._profile = profile
        self._env = env
        self._url = getattr(env.config, "socket", None) or ""
        self._real: Launcher | None = None

    def _launcher(self) -> Launcher | str:
        """The real launcher, or why there is none yet."""
        if self._real is None:
            why = _missing(self._url)
            if why is not None:
                return why
            from femd.launchers.podman import PodmanLauncher

            self._real = PodmanLauncher(self._profile, self._env)
        return self._real

    def probe(self) -> Capabilities:
        """What the podman service can enforce; unavailable while it has no socket."""
        real = self._launcher()
        if isinstance(real, str):
            return Capabilities(launcher=self.name, available=False, problems=(real,))
        return real.probe()

    def launch(self, spec: LaunchSpec) -> Handle:
        """Start *spec* through the real launcher.

        Raises:
            LauncherUnavailableError: the podman service has no socket.
            LaunchError: the real launcher refused or failed.
        """
        real = self._launcher()
        if isinstance(real, str):
            raise LauncherUnavailableError(real)
        return real.launch(spec)

    def adopt(self, task_id: TaskId) -> Handle | None:
        """Find a surviving container of *task_id*; none without a service.

        Raises:
            LaunchError: podman could not be asked.
        """
        real = self._launcher()
        if isinstance(real, str):
            return None
        return real.adopt(task_id)
