"""The policy document's types (``kind: Policy``) and its JSON Schema.

Owns every key a steward may write, its constraints and defaults, and the
docstrings that ship in ``policies/schema.json``. Does not read files
(``femd.policy.load``) nor check cross-references (``femd.policy.problems``).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from femd.model import (
    AbsPath,
    HostPortPattern,
    KeyId,
    LauncherName,
    Name,
    Peer,
    Port,
    Strict,
    json_schema,
    unknown_launcher,
)

__all__ = [
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_OUTPUT_BYTES",
    "DEFAULT_PIDS",
    "DEFAULT_TIMEOUT_S",
    "Dataset",
    "Defaults",
    "IngressPolicy",
    "MaxResources",
    "NetworkPolicy",
    "OutputsPolicy",
    "Policy",
    "Project",
    "Runtime",
    "Signer",
    "default_limits",
    "policy_schema",
]

_Pattern = Annotated[str, Meta(min_length=1, max_length=512)]


class Signer(Strict, frozen=True, kw_only=True):
    """A person or service whose Ed25519 key may sign tasks.

    Give exactly one of `public_key_file` (a PEM file, relative to the policy
    file) or `public_key` (the PEM text). A signer counts only for the projects
    that list it. After `expires` (a UTC date, valid through that day) the
    signer no longer counts and any task it signed is denied (`signer.expired`).
    """

    public_key_file: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    public_key: Annotated[str, Meta(max_length=4096)] | None = None
    expires: date | None = None

    def __post_init__(self) -> None:
        """Exactly one source of the key."""
        if (self.public_key_file is None) == (self.public_key is None):
            raise ValueError("give exactly one of `public_key_file` or `public_key`")


class Dataset(Strict, frozen=True, kw_only=True):
    """A dataset on this node; only the policy knows its host path."""

    path: AbsPath


class Runtime(Strict, frozen=True, kw_only=True):
    """A read-only runtime tasks may use, e.g. a virtualenv of pinned packages.

    `path` is a directory on this node (built by the sysadmin from pinned,
    hash-checked packages; see `scripts/install.sh`), mounted read-only into
    the task at the same path. Nothing is downloaded when a task runs.
    """

    path: AbsPath


class MaxResources(Strict, frozen=True, kw_only=True):
    """Upper limits for a task; a task asking more is denied (`resources.exceeded`).

    A field left out takes the node-wide value from `defaults.max_resources`.
    """

    cpus: Annotated[float, Meta(gt=0, le=1024)] | None = None
    memory_mb: Annotated[int, Meta(ge=1)] | None = None
    timeout_s: Annotated[int, Meta(ge=1)] | None = None
    pids: Annotated[int, Meta(ge=1)] | None = None


class OutputsPolicy(Strict, frozen=True, kw_only=True):
    """How many bytes of outputs may leave the node for one task."""

    max_bytes: Annotated[int, Meta(ge=0)]


class IngressPolicy(Strict, frozen=True, kw_only=True):
    """Ports tasks may listen on, and the peers that may connect to them.

    Each port is exposed on the same port of the node, for the task's lifetime,
    to the listed `peers` only (CIDRs, addresses or host names; a name is
    resolved when the task starts).
    """

    ports: Annotated[tuple[Port, ...], Meta(min_length=1, max_length=64)]
    peers: Annotated[tuple[Peer, ...], Meta(min_length=1, max_length=256)]


class NetworkPolicy(Strict, frozen=True, kw_only=True):
    """Network a project's tasks may have; give `egress`, `ingress` or both.

    `egress`: `host:port` shell-style patterns of destinations a task may ask
    for (`network.allow` in its manifest). `ingress`: ports a task may listen
    on (`network.listen`) and who may connect.
    """

    egress: Annotated[tuple[HostPortPattern, ...], Meta(min_length=1)] | None = None
    ingress: IngressPolicy | None = None

    def __post_init__(self) -> None:
        """At least one of the two is given."""
        if self.egress is None and self.ingress is None:
            raise ValueError("`network` needs `egress`, `ingress` or both")


class Project(Strict, frozen=True, kw_only=True):
    """What one project may run here. Anything a project does not list is denied.

    `images` are shell-style globs on the image repository (the part before
    `@sha256:`); the digest is always required. `git` globs match whole
    repository URLs. `datasets` name entries of the top-level `datasets`, and
    `runtimes` entries of the top-level `runtimes`.
    """

    signers: Annotated[tuple[Name, ...], Meta(min_length=1)]
    threshold: Annotated[int, Meta(ge=1)] = 1
    launchers: tuple[LauncherName, ...] = ()
    images: tuple[_Pattern, ...] = ()
    git: tuple[_Pattern, ...] = ()
    datasets: tuple[Name, ...] = ()
    runtimes: tuple[Name, ...] = ()
    max_resources: MaxResources | None = None
    network: Literal["none"] | NetworkPolicy = "none"
    outputs: OutputsPolicy | None = None

    def __post_init__(self) -> None:
        """Refuse a launcher name this femd does not have."""
        if (unknown := unknown_launcher(self.launchers)) is not None:
            raise ValueError(f"launchers[{unknown[0]}]: {unknown[1]}")


# A model checkpoint fits; the steward lowers it per project or node-wide.
DEFAULT_OUTPUT_BYTES: Final = 2 * 1024 * 1024 * 1024


# Node-wide limits when the policy sets none (``defaults.max_resources``).
DEFAULT_CPUS: Final = 1
DEFAULT_MEMORY_MB: Final = 1024
DEFAULT_TIMEOUT_S: Final = 600
DEFAULT_PIDS: Final = 128


def default_limits() -> MaxResources:
    """The node-wide limits when the policy sets none."""
    return MaxResources(
        cpus=DEFAULT_CPUS,
        memory_mb=DEFAULT_MEMORY_MB,
        timeout_s=DEFAULT_TIMEOUT_S,
        pids=DEFAULT_PIDS,
    )


def _default_outputs() -> OutputsPolicy:
    return OutputsPolicy(max_bytes=DEFAULT_OUTPUT_BYTES)


class Defaults(Strict, frozen=True, kw_only=True):
    """Node-wide limits for projects that set none.

    Small and safe by default: 1 cpu, 1024 MB, 600 s, 128 pids; outputs up to
    2 GiB (a model checkpoint fits).
    """

    max_resources: MaxResources = msgspec.field(default_factory=default_limits)
    outputs: OutputsPolicy = msgspec.field(default_factory=_default_outputs)


class Policy(Strict, frozen=True, kw_only=True):
    """A femd node policy (`apiVersion: femd/v1`, `kind: Policy`). Default deny."""

    api_version: Literal["femd/v1"] = msgspec.field(name="apiVersion")
    kind: Literal["Policy"]
    node: Name
    signers: dict[Name, Signer] = msgspec.field(default_factory=dict)
    revoked_keyids: tuple[KeyId, ...] = ()
    datasets: dict[Name, Dataset] = msgspec.field(default_factory=dict)
    runtimes: dict[Name, Runtime] = msgspec.field(default_factory=dict)
    projects: dict[Name, Project] = msgspec.field(default_factory=dict)
    defaults: Defaults = msgspec.field(default_factory=Defaults)


def policy_schema() -> dict[str, Any]:
    """Return the policy's JSON Schema, generated from the types above."""
    return json_schema(Policy)
