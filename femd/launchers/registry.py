"""The closed set of launchers: one registration line each (STYLE rule 6).

Owns ``LAUNCHERS`` (name -> ``Registration``: factory, profile section, spec
checks, work-dir hook, the doctor's trial), ``LauncherEnv`` (what a
factory gets besides the profile), and building and probing one launcher per
(profile, back-end). Everything else in femd learns about launchers from
here: the names a manifest or policy may use (``model.LauncherName``), the
sections a profile may hold (``profile.profile_type``), the checks admission
runs. No entry points, no discovery: a new launcher is its own package and
one line below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple, Protocol

import msgspec

from femd.decision import Reason
from femd.errors import cut
from femd.launchers import Capabilities, Launcher, LauncherProfile, LaunchSpec
from femd.launchers.slurm.settings import SlurmSettings
from femd.launchers.slurm.settings import spec_reasons as slurm_reasons
from femd.launchers.targets import podman_reasons, process_reasons
from femd.launchers.workdir import open_work, podman_work

__all__ = [
    "LAUNCHERS",
    "LauncherEnv",
    "LauncherFactory",
    "Registration",
    "Trial",
    "build",
    "build_all",
    "environment",
    "probe",
    "registration",
]


class LauncherEnv(msgspec.Struct, frozen=True, kw_only=True):
    """What the agent gives a launcher besides its profile.

    ``state_dir``: the launcher's own directory (``<state_dir>/launchers/<name>``;
    created on first use by the launcher). ``scope``: a short tag of this agent,
    stable across restarts, for host-wide names (cgroups). ``config``: the
    launcher's section of ``femd.yaml`` (``podman``: ``PodmanConfig``), or None.
    """

    state_dir: Path
    scope: str
    config: msgspec.Struct | None = None


class LauncherFactory(Protocol):
    """Builds a launcher for one profile.

    A launcher serves the profile it was built and probed with: the agent
    builds one per (launcher, profile) and a spec naming another profile is
    refused.
    """

    def __call__(self, profile: LauncherProfile, env: LauncherEnv) -> Launcher:
        """Build the launcher; raises nothing (``probe()`` reports problems)."""
        ...


class Trial(NamedTuple):
    """What ``femd doctor`` runs to prove a launcher works here.

    ``launcher``: the launcher the trivial task runs with (built as the
    agent's, unless the launcher says otherwise); ``argv``: the trivial
    command; ``image``: the image it runs in, for launchers that run images.
    """

    launcher: Launcher
    argv: tuple[str, ...] = ("/bin/sh", "-c", "id")
    image: str | None = None


def _no_reasons(spec: LaunchSpec) -> list[Reason]:
    del spec
    return []


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """One launcher kind: everything femd needs to know about it, in one place.

    ``factory``: builds it (imports its package lazily). ``settings``: the type
    of its section in a launcher profile (``<name>:``), when the profile does
    not declare one itself. ``spec_reasons``: its pure checks of a built
    ``LaunchSpec`` (reserved mount targets...), run at admission (agent and
    ``femd check``) and again by the launcher. ``prepare_work``: makes a
    task's work dir (``<work>/out`` inside) reachable by its sandbox's user.
    ``image``: its tasks run an image (a manifest must name one) instead of a
    host command (a manifest must give ``command``). ``trial``: what
    ``femd doctor`` runs to prove it (default: ``/bin/sh -c id`` with the
    launcher the factory builds); it may raise ``FemdError`` (the doctor
    reports it as the trial's failure). ``network_helper``: its tasks reach
    the network through femd's namespace helper (``femd.launchers.netns``),
    whose zygote ``femd run`` then starts early (not podman's: it joins a
    container's namespace only when femd runs as root, not under its unit).
    """

    factory: LauncherFactory
    image: bool = False
    settings: type[msgspec.Struct] | None = None
    spec_reasons: Callable[[LaunchSpec], list[Reason]] = _no_reasons
    prepare_work: Callable[[Path], None] = open_work
    trial: Callable[[LauncherProfile, LauncherEnv], Trial] | None = None
    network_helper: bool = False

    def trial_for(self, profile: LauncherProfile, env: LauncherEnv) -> Trial:
        """The doctor's trial of this launcher for *profile* (see ``trial``).

        Raises:
            FemdError: the trial cannot be set up (an image cannot be made).
        """
        if self.trial is not None:
            return self.trial(profile, env)
        return Trial(self.factory(profile, env))


def _podman(profile: LauncherProfile, env: LauncherEnv) -> Launcher:
    # podman-py is imported only once a podman socket exists (and never where
    # the process launcher alone is used).
    from femd.launchers.deferred import DeferredPodmanLauncher

    return DeferredPodmanLauncher(profile, env)


def _podman_trial(profile: LauncherProfile, env: LauncherEnv) -> Trial:
    from femd.launchers.podman.trial import doctor_trial

    return doctor_trial(profile, env)


def _process(profile: LauncherProfile, env: LauncherEnv) -> Launcher:
    from femd.launchers.process import BubblewrapLauncher

    return BubblewrapLauncher(profile, env)


def _slurm(profile: LauncherProfile, env: LauncherEnv) -> Launcher:
    from femd.launchers.slurm.launcher import SlurmLauncher

    return SlurmLauncher(profile, env)


# STYLE rule 6: a closed set, no entry points. A new launcher is its own
# package and one line here; its name (``model.LauncherName`` accepts every
# key), its profile section (``settings``) and its checks come from that line.
LAUNCHERS: Final[Mapping[str, Registration]] = MappingProxyType(
    {
        "podman": Registration(
            factory=_podman,
            image=True,
            spec_reasons=podman_reasons,
            prepare_work=podman_work,
            trial=_podman_trial,
        ),
        "process": Registration(
            factory=_process, spec_reasons=process_reasons, network_helper=True
        ),
        "slurm": Registration(
            factory=_slurm, settings=SlurmSettings, spec_reasons=slurm_reasons
        ),
    }
)


def registration(name: str) -> Registration:
    """The registration of launcher *name* (looked up when called).

    Raises:
        KeyError: no launcher has that name (names were checked on decoding).
    """
    return LAUNCHERS[name]


def environment(
    name: str, state_dir: Path, configs: Mapping[str, msgspec.Struct] | None = None
) -> LauncherEnv:
    """The environment of launcher *name* for an agent whose state is *state_dir*."""
    from femd.launchers.cgroup import scope_of  # cgroup imports this package
    from femd.statedir import StateDir

    return LauncherEnv(
        state_dir=StateDir(state_dir).launcher(name),
        scope=scope_of(state_dir),
        config=(configs or {}).get(name),
    )


def build(
    profiles: Mapping[str, LauncherProfile],
    *,
    state_dir: Path,
    configs: Mapping[str, msgspec.Struct] | None = None,
) -> dict[tuple[str, str], Launcher]:
    """One launcher per (profile, back-end) the profiles define; none probed.

    *configs*: each launcher's section of ``femd.yaml`` by launcher name.
    """
    launchers: dict[tuple[str, str], Launcher] = {}
    for pname, profile in sorted(profiles.items()):
        for name, registration in LAUNCHERS.items():
            if profile.section(name) is not None:
                env = environment(name, state_dir, configs)
                launchers[(pname, name)] = registration.factory(profile, env)
    return launchers


def probe(launcher: Launcher) -> Capabilities:
    """``launcher.probe()``; one that raises is recorded as unavailable, why."""
    try:
        return launcher.probe()
    except Exception as e:  # noqa: BLE001 (a broken back-end must not stop us)
        return Capabilities(
            launcher=launcher.name,
            available=False,
            problems=(
                f"probe failed: {type(e).__name__}: {cut(e, 200, keep_end=True)}",
            ),
        )


def build_all(
    profiles: Mapping[str, LauncherProfile],
    *,
    state_dir: Path,
    configs: Mapping[str, msgspec.Struct] | None = None,
) -> tuple[dict[tuple[str, str], Launcher], dict[tuple[str, str], Capabilities]]:
    """Build and probe one launcher per (profile, back-end) the profiles define.

    A back-end whose probe raises is recorded as unavailable with the reason: a
    broken back-end never stops the agent or ``femd doctor``.
    """
    launchers = build(profiles, state_dir=state_dir, configs=configs)
    return launchers, {key: probe(launcher) for key, launcher in launchers.items()}
