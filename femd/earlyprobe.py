"""The node's launchers, probed while the rest of the agent loads.

Owns ``EarlyProbe``: ``femd run`` loads the launcher profiles right after it
starts the broker link (``femd.earlylink``) and builds and probes a launcher
per (profile, back-end) in a thread, while the agent is imported and loads
its policy. A probe mostly waits on its sandboxes (a smoke run, a network
namespace); on a small host it took as long as the broker's handshakes, after
them. The network helpers' zygote, when a launcher of the profiles uses it,
starts first, so that its interpreter boots meanwhile. The agent takes the
launchers and their capabilities when its loop is about to run, and reports
them (log, audit) then, as if it had probed then: nothing is admitted on a
capability not yet proven, and the audit trail reads as before. A reload
probes afresh, in the agent. Does not log or audit.
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
    registry,
)
from femd.launchers.cgroup import detect

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
        self._profile_error: ConfigError | None = None
        self._error: BaseException | None = None
        self._probed: Probed | None = None
        self._profiles: dict[str, LauncherProfile] = {}
        self._thread: threading.Thread | None = None
        try:
            self._profiles = load_profiles(Path(config.launchers))
        except ConfigError as e:
            self._profile_error = e
            return
        self._thread = threading.Thread(
            target=self._probe,
            args=(state_dir, config, _use_helper(self._profiles)),
            name="femd-probe",
            daemon=True,
        )
        self._thread.start()

    def profiles(self) -> dict[str, LauncherProfile]:
        """The loaded profiles.

        Raises:
            ConfigError: a profile is invalid (the whole set is refused).
        """
        if self._profile_error is not None:
            raise self._profile_error
        return self._profiles

    def result(self) -> Probed:
        """Wait for the probes; the launchers and what each can do.

        Raises:
            ConfigError: a profile is invalid.
            Exception: what building the launchers raised (a probe that raises
                is an unavailable launcher, not an error).
        """
        self.close()
        if self._profile_error is not None:
            raise self._profile_error
        if self._error is not None:
            raise self._error
        assert self._probed is not None  # noqa: S101 (set when no error)
        return self._probed

    def close(self) -> None:
        """Wait for the probes to end (their sandboxes and cgroups gone)."""
        if self._thread is not None:
            self._thread.join()

    def _probe(self, state_dir: Path, config: AgentConfig, helper: bool) -> None:
        if helper:
            # cgroup v2: femd leaves its unit's cgroup for a leaf of its own
            # before it starts a lasting process, or that process would stay
            # beside the task cgroups, where v2 allows none (detect() moves
            # femd, all its threads; the process launcher's probe calls it
            # again, a no-op). Meanwhile femd's other threads start no process.
            detect()
            netns.warm()
        try:
            self._probed = build_all(
                self._profiles,
                state_dir=state_dir,
                configs=config.launcher_configs(),
            )
        except BaseException as e:  # noqa: BLE001 (raised in the agent's thread)
            self._error = e


def _use_helper(profiles: dict[str, LauncherProfile]) -> bool:
    """Does a launcher of *profiles* give its tasks network through the helper?"""
    return any(
        reg.network_helper and p.network.enabled and p.section(name) is not None
        for p in profiles.values()
        for name, reg in registry.LAUNCHERS.items()
    )
