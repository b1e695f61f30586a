"""The node's launchers, probed while the rest of the agent loads.

Owns ``EarlyProbe``: ``femd run`` loads the launcher profiles right after it
starts the broker link (``femd.earlylink``) and builds and probes a launcher
per (profile, back-end) in a thread, while the agent is imported and loads
its policy. A probe mostly waits on its sandboxes (a smoke run, a network
namespace); on a small host it took as long as the broker's handshakes, after
them. The agent takes the launchers and their capabilities when its loop is
about to run, and reports them (log, audit) then, as if it had probed then:
nothing is admitted on a capability not yet proven, and the audit trail reads
as before. A reload probes afresh, in the agent. Does not log or audit.
"""

from __future__ import annotations

import threading
from pathlib import Path

from femd.config import AgentConfig
from femd.errors import ConfigError
from femd.launchers import (
    Capabilities,
    Launcher,
    LauncherProfile,
    build_all,
    load_profiles,
    netns,
)

__all__ = ["EarlyProbe"]

Launchers = dict[tuple[str, str], Launcher]
Probed = tuple[Launchers, dict[tuple[str, str], Capabilities]]


class EarlyProbe:
    """Launcher profiles, loaded, and their launchers being built and probed."""

    def __init__(self, config: AgentConfig, state_dir: Path) -> None:
        """Load the profiles; if they load, start building and probing.

        A profile error is kept for ``profiles()``: the agent raises it after
        loading its policy, as it did when it loaded both itself.
        """
        self._error: BaseException | None = None
        self._probed: Probed | None = None
        self._profiles: dict[str, LauncherProfile] = {}
        self._thread: threading.Thread | None = None
        try:
            self._profiles = load_profiles(Path(config.launchers))
        except ConfigError as e:
            self._error = e
            return
        if any(p.network.enabled for p in self._profiles.values()):
            netns.warm()  # its interpreter starts while the agent loads
        self._thread = threading.Thread(
            target=self._probe,
            args=(state_dir, config),
            name="femd-probe",
            daemon=True,
        )
        self._thread.start()

    def profiles(self) -> dict[str, LauncherProfile]:
        """The loaded profiles.

        Raises:
            ConfigError: a profile is invalid (the whole set is refused).
        """
        if isinstance(self._error, ConfigError):
            raise self._error
        return self._profiles

    def result(self) -> Probed:
        """Wait for the probes; the launchers and what each can do.

        Raises:
            ConfigError: a profile is invalid.
            Exception: what building the launchers raised (a probe that raises
                is an unavailable launcher, not an error).
        """
        self.close()
        if self._error is not None:
            raise self._error
        assert self._probed is not None  # noqa: S101 (set when no error)
        return self._probed

    def close(self) -> None:
        """Wait for the probes to end (their sandboxes and cgroups gone)."""
        if self._thread is not None:
            self._thread.join()

    def _probe(self, state_dir: Path, config: AgentConfig) -> None:
        try:
            self._probed = build_all(
                self._profiles,
                state_dir=state_dir,
                configs=config.launcher_configs(),
            )
        except BaseException as e:  # noqa: BLE001 (raised in the agent's thread)
            self._error = e
