"""Launcher profiles: the sysadmin-owned, declarative settings of each back-end.

Owns the ``LauncherProfile`` document (``launchers/<name>.yaml``), the
settings sections of the built-in back-ends (``ProcessSettings`` for
bubblewrap, also the sandbox of slurm jobs; ``PodmanSettings`` for rootless
Podman), ``profile_type()`` (the document with the sections every other
registered launcher declares: ``Registration.settings``, e.g. ``slurm``) and
``load_profile()`` / ``load_profiles()``, which validate a profile as strictly
as the policy: duplicate YAML keys, unknown fields and wrong types are refused
with ``file:line: field: message``.

Does not run anything (the back-ends in ``process``, ``podman`` and ``slurm``
do) and does not decide whether a task may use a profile (the policy does). DESIGN
"Launchers": site-owned settings come from here, never from the task; a task can
only name a profile.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Optional

import msgspec
from msgspec import Meta

from femd.errors import ConfigError, cut
from femd.model import AbsPath, Name, Strict
from femd.yamlfile import YamlError, field_of, line_of, load_yaml

__all__ = [
    "DEFAULT_RO_BINDS",
    "LauncherProfile",
    "NetworkSettings",
    "PodmanSettings",
    "ProcessSettings",
    "load_profile",
    "load_profiles",
    "new_profile",
    "profile_type",
]

DEFAULT_RO_BINDS: Final[tuple[str, ...]] = (
    "/usr",
    "/bin",
    "/lib",
    "/lib64",
    "/sbin",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ld.so.cache",
)

UserName = Annotated[
    str,
    Meta(
        pattern=r"^(?:[a-z_][a-z0-9_-]{0,31})$(?!\n)",
        description="A local user name (letters, digits, `_`, `-`; at most 32).",
    ),
]
Megabytes = Annotated[int, Meta(ge=1, le=1 << 20)]


class ProcessSettings(Strict, frozen=True, kw_only=True):
    """How the `process` launcher (bubblewrap) runs a task.

    The sandbox unshares every namespace, drops all capabilities, clears the
    environment and sees only the read-only binds listed here, the task's
    read-only inputs, one writable output directory and a private `/tmp`.
    """

    ro_binds: tuple[AbsPath, ...] = DEFAULT_RO_BINDS
    """Host paths bound read-only at the same place; missing ones are skipped and
    host symlinks (e.g. `/bin -> usr/bin`) are recreated as symlinks."""
    run_as: UserName = "femd-task"
    """User the task runs as when femd itself runs as root (tests, some
    installs). When femd is unprivileged, tasks run as femd's own user."""
    tmp_size_mb: Megabytes = 64
    """Size of the private `/tmp` and `/dev/shm` tmpfs, each."""
    nofile: Annotated[int, Meta(ge=16, le=1 << 20)] = 1024
    """RLIMIT_NOFILE: open files per process."""
    fsize_mb: Megabytes = 1024
    """RLIMIT_FSIZE: the largest file a task process may write (also bounds
    each output file)."""
    seccomp: AbsPath | None = None
    """Optional extra seccomp filter (compiled classic BPF, as bwrap's
    `--add-seccomp-fd` takes it), applied on top of femd's built-in one."""


class PodmanSettings(Strict, frozen=True, kw_only=True):
    """How the `podman` launcher (rootless Podman) runs a task."""

    runtime: Annotated[str, Meta(pattern=r"^(?:[a-z0-9._-]{1,64})$(?!\n)")] = "runc"
    """OCI runtime (`runc`, `crun`)."""
    read_only: bool = True
    """Read-only root filesystem."""
    tmp_size_mb: Megabytes = 64
    """Size of the tmpfs on `/tmp`."""
    seccomp_profile: AbsPath | None = None
    """Seccomp profile (JSON); Podman's default when absent."""
    signature_policy: AbsPath | None = None
    """containers-policy.json enforced when pulling."""
    auth_file: AbsPath | None = None
    """Registry credentials file."""
    userns: Annotated[str, Meta(pattern=r"^(?:auto|keep-id|nomap)$(?!\n)")] = "auto"
    """User namespace mode."""
    extra_security_opt: tuple[
        Annotated[str, Meta(min_length=1, max_length=512)], ...
    ] = ()
    """Additional `--security-opt` values (e.g. an AppArmor profile)."""


_Address = Annotated[
    str, Meta(min_length=2, max_length=64, pattern=r"^[0-9a-fA-F.:]+$(?!\n)")
]


class NetworkSettings(Strict, frozen=True, kw_only=True):
    """How femd gives tasks the network their policy allows (both launchers).

    A task always has its own empty network namespace; femd forwards each
    allowed destination and listening port itself (docs/network.md).
    """

    enabled: bool = True
    """false: tasks of this profile get no network whatever the policy allows;
    a task asking for some is refused (`launcher.unenforceable`)."""
    ingress_bind: tuple[_Address, ...] = ()
    """Host addresses a task's listening ports are exposed on; empty: every
    address (`::`, dual-stack, or `0.0.0.0` where IPv6 is off)."""
    hosts: dict[
        Annotated[str, Meta(min_length=1, max_length=253)], tuple[_Address, ...]
    ] = msgspec.field(default_factory=dict)
    """Fixed addresses for egress host names, used instead of DNS (e.g. the
    federation server's address, pinned by the site)."""


class LauncherProfile(Strict, frozen=True, kw_only=True):
    """A named set of launcher settings, chosen by a task only by its name.

    A launcher whose section is absent is refused for tasks naming this profile.
    """

    api_version: Literal["femd/v1"] = msgspec.field(name="apiVersion")
    kind: Literal["LauncherProfile"]
    name: Name
    """Must equal the file name without `.yaml`."""
    description: str = ""
    process: ProcessSettings | None = None
    podman: PodmanSettings | None = None
    network: NetworkSettings = msgspec.field(default_factory=NetworkSettings)

    def section(self, launcher: str) -> msgspec.Struct | None:
        """The settings section of *launcher* in this profile, or None."""
        value = getattr(self, launcher, None)
        return value if isinstance(value, msgspec.Struct) else None


def _sections() -> dict[str, type[msgspec.Struct]]:
    """The profile sections the registered launchers declare (by name)."""
    from femd.launchers.registry import LAUNCHERS  # it imports this module

    return {n: r.settings for n, r in LAUNCHERS.items() if r.settings is not None}


@functools.cache
def _extended(sections: tuple[tuple[str, type[msgspec.Struct]], ...]) -> type:
    fields = [(name, Optional[kind], None) for name, kind in sections]  # noqa: UP045
    return msgspec.defstruct(
        "LauncherProfile",
        fields,
        bases=(LauncherProfile,),
        kw_only=True,
        frozen=True,
        forbid_unknown_fields=True,
        module=__name__,
    )


def profile_type(
    sections: Mapping[str, type[msgspec.Struct]] | None = None,
) -> type[LauncherProfile]:
    """``LauncherProfile`` with a section per registered launcher that has one.

    A launcher declares its section in its registration (``LAUNCHERS``), so
    this module need not change for a new launcher. *sections* defaults to
    the registry's.
    """
    found = _sections() if sections is None else dict(sections)
    builtin = LauncherProfile.__struct_fields__
    extra = tuple(sorted((n, k) for n, k in found.items() if n not in builtin))
    if not extra:
        return LauncherProfile
    kind: type[LauncherProfile] = _extended(extra)
    return kind


def new_profile(**fields: Any) -> LauncherProfile:  # noqa: ANN401
    """A profile from Python values (every registered section accepted).

    Raises:
        msgspec.ValidationError: a field is unknown or of the wrong type.
    """
    data = {"apiVersion": "femd/v1", "kind": "LauncherProfile"} | fields
    profile: LauncherProfile = msgspec.convert(
        data, profile_type(), from_attributes=True
    )
    return profile


_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def _where(path: Path, node: Any, parts: list[str | int]) -> str:  # noqa: ANN401
    line = line_of(node, parts)[0]
    return f"{path}:{line}" if line is not None else str(path)


def load_profile(path: Path) -> LauncherProfile:
    """Read and validate one profile file.

    Raises:
        ConfigError: unreadable file, invalid YAML, duplicate key, wrong field,
            or a ``name`` that differs from the file name;
            printed as ``file:line: field: message``.
    """
    try:
        data, node = load_yaml(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read launcher profile: {cut(e)}") from e
    except YamlError as e:
        where = f"{path}:{e.line}" if e.line is not None else str(path)
        raise ConfigError(f"{where}: {e.message}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a launcher profile must be a mapping")
    try:
        kind = profile_type()
        profile = msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as e:
        # Plain words only for a document that fails: not held by an idle agent.
        from femd.plain import first

        parts, message = first(data, kind, e)
        field = field_of(parts) or "$"
        raise ConfigError(f"{_where(path, node, parts)}: {field}: {message}") from e
    if profile.name != path.stem:
        raise ConfigError(
            f"{_where(path, node, ['name'])}: name: must equal the file name "
            f"(got {cut(profile.name)!r}, expected {cut(path.stem)!r})"
        )
    return profile


def load_profiles(directory: Path) -> dict[str, LauncherProfile]:
    """Load every ``*.yaml`` profile in *directory*, keyed by name.

    Raises:
        ConfigError: the directory cannot be read or any profile is invalid
            (the whole set is refused, so a reload keeps the previous one).
    """
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".yaml")
    except OSError as e:
        raise ConfigError(
            f"{directory}: cannot list launcher profiles: {cut(e)}"
        ) from e
    return {p.stem: load_profile(p) for p in files}
