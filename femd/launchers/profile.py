"""Launcher profiles: the sysadmin-owned, declarative settings of each back-end.

Owns the ``LauncherProfile`` document (``launchers/<name>.yaml``), its
settings sections (``ProcessSettings`` for bubblewrap, ``PodmanSettings`` for
rootless Podman, ``SlurmSettings`` for Slurm batch jobs) and ``load_profile()``
/ ``load_profiles()``, which validate a profile as strictly as the policy:
duplicate YAML keys, unknown fields and wrong types are refused with
``file:line: field: message``.

Does not run anything (the back-ends in ``process``, ``podman`` and ``slurm``
do) and does not decide whether a task may use a profile (the policy does). DESIGN
"Launchers": site-owned settings come from here, never from the task; a task can
only name a profile.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from femd.errors import ConfigError, cut
from femd.model import AbsPath, Name, Strict
from femd.plain import first
from femd.yamlfile import YamlError, field_of, line_of, load_yaml

__all__ = [
    "DEFAULT_RO_BINDS",
    "LauncherProfile",
    "NetworkSettings",
    "PodmanSettings",
    "ProcessSettings",
    "SlurmSettings",
    "load_profile",
    "load_profiles",
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


SlurmName = Annotated[
    str,
    Meta(
        pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$(?!\n)",
        description="A Slurm partition, account or QOS name.",
    ),
]


class SlurmSettings(Strict, frozen=True, kw_only=True):
    """How the `slurm` launcher hands a task to the site's Slurm as a batch job.

    The job runs the task on a compute node in the same bubblewrap sandbox as
    the `process` launcher (`sandbox`); Slurm's cgroups enforce memory and
    cpus, its time limit backs femd's own timeout.
    """

    stage_dir: AbsPath
    """A directory on the cluster's shared filesystem, at the same path on this
    host and on every compute node: each task gets a subdirectory holding its
    job script, inputs, code and output directory while it runs."""
    shared: tuple[AbsPath, ...] = ()
    """Host paths the compute nodes see at the same place (e.g. `/gpfs/data`):
    inputs under them are bound in place; other inputs are copied to
    `stage_dir`."""
    partition: SlurmName | None = None
    """`--partition` of every job; the cluster's default when absent."""
    account: SlurmName | None = None
    """`--account` of every job; the user's default when absent."""
    qos: SlurmName | None = None
    """`--qos` of every job."""
    slurm_conf: AbsPath | None = None
    """`SLURM_CONF` for the client commands; the system's when absent."""
    poll_s: Annotated[float, Meta(ge=0.1, le=60)] = 1.0
    """How often a running job's state is asked of Slurm."""
    sandbox: ProcessSettings = msgspec.field(default_factory=ProcessSettings)
    """The bubblewrap sandbox on the compute node (`run_as`: the job's user
    when femd runs as root)."""


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
    slurm: SlurmSettings | None = None
    network: NetworkSettings = msgspec.field(default_factory=NetworkSettings)


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
        profile = msgspec.convert(data, LauncherProfile, strict=True)
    except msgspec.ValidationError as e:
        parts, message = first(data, LauncherProfile, e)
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
