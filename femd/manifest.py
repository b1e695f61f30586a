"""The ``femd/v1`` task manifest: the signed payload of an envelope.

Owns the ``Task`` and ``Cancel`` documents and ``decode_manifest()``, the one
place their bytes are decoded. Decides nothing: whether a valid manifest may
run is ``decision``'s business.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from femd.errors import ManifestError, cut
from femd.model import (
    AbsPath,
    EnvName,
    GitCommit,
    GitUrl,
    HostPort,
    ImageName,
    LauncherName,
    Name,
    Port,
    RelPath,
    Strict,
    TaskId,
    UtcTime,
    explain,
    refuse_duplicate_keys,
    runs_image,
    unknown_launcher,
)

__all__ = [
    "Cancel",
    "Input",
    "Manifest",
    "NetworkEgress",
    "NetworkNone",
    "Outputs",
    "Resources",
    "Source",
    "Task",
    "decode_manifest",
    "encode_manifest",
]

_Arg = Annotated[str, Meta(max_length=65536)]


class Source(Strict, frozen=True, kw_only=True):
    """Code to fetch: a git repository at one exact commit."""

    git: GitUrl
    commit: GitCommit
    path: RelPath = "."


class Input(Strict, frozen=True, kw_only=True):
    """A dataset, named as the node's policy names it, mounted read-only."""

    dataset: Name
    mount: AbsPath


class Outputs(Strict, frozen=True, kw_only=True):
    """The one writable directory whose contents are sent back, and its cap."""

    path: AbsPath = "/out"
    max_bytes: Annotated[int, Meta(ge=0)] | None = None


class Resources(Strict, frozen=True, kw_only=True, omit_defaults=True):
    """Requested limits; an omitted one is the policy's maximum for the project."""

    cpus: Annotated[float, Meta(gt=0, le=1024)] | None = None
    memory_mb: Annotated[int, Meta(ge=1)] | None = None
    timeout_s: Annotated[int, Meta(ge=1)] | None = None
    pids: Annotated[int, Meta(ge=1)] | None = None


_Listen = Annotated[tuple[Port, ...], Meta(max_length=16)]


def _check_listen(listen: tuple[int, ...]) -> None:
    if len(set(listen)) != len(listen):
        raise ValueError("`network.listen` lists a port twice")


class NetworkNone(Strict, frozen=True, tag_field="mode", tag="none"):
    """No outbound network (the default); ``listen``: ports others may reach.

    ``listen`` names the TCP ports the task listens on inside its sandbox;
    the node exposes each on the same host port to the peers its policy allows.
    """

    listen: _Listen = ()

    def __post_init__(self) -> None:
        """A port is listed once."""
        _check_listen(self.listen)


class NetworkEgress(Strict, frozen=True, tag_field="mode", tag="egress"):
    """Outbound connections to the listed ``host:port`` only (and ``listen``)."""

    allow: Annotated[tuple[HostPort, ...], Meta(min_length=1, max_length=64)]
    listen: _Listen = ()

    def __post_init__(self) -> None:
        """A port is listed once."""
        _check_listen(self.listen)


class _Message(Strict, frozen=True, tag_field="kind"):
    api_version: Literal["femd/v1"] = msgspec.field(name="apiVersion")


class Task(_Message, frozen=True, tag="Task", kw_only=True):
    """A signed request to run one workload on the nodes it lists."""

    id: TaskId
    project: Name
    issuer: Annotated[str, Meta(max_length=256)] | None = None
    issued_at: UtcTime
    expires_at: UtcTime
    nodes: Annotated[tuple[Name, ...], Meta(min_length=1, max_length=256)]
    launcher: LauncherName
    profile: Name = "default"
    image: ImageName | None = None
    runtime: Name | None = None
    source: Source | None = None
    command: Annotated[tuple[_Arg, ...], Meta(max_length=4096)] = ()
    env: Annotated[dict[EnvName, _Arg], Meta(max_length=1024)] = msgspec.field(
        default_factory=dict
    )
    inputs: Annotated[tuple[Input, ...], Meta(max_length=64)] = ()
    outputs: Outputs = msgspec.field(default_factory=Outputs)
    resources: Resources = msgspec.field(default_factory=Resources)
    network: NetworkNone | NetworkEgress = msgspec.field(default_factory=NetworkNone)

    def __post_init__(self) -> None:
        """Check what one field alone cannot say (DESIGN "task manifest")."""
        if self.expires_at <= self.issued_at:
            raise ValueError("`expires_at` must be later than `issued_at`")
        if (unknown := unknown_launcher([self.launcher])) is not None:
            raise ValueError(f"launcher: {unknown[1]}")
        image = runs_image(self.launcher)  # the registry says (podman)
        if image and self.image is None:
            raise ValueError(
                f"`image` is required when `launcher` is `{self.launcher}`"
            )
        if not image and not self.command:
            raise ValueError(
                f"`command` is required when `launcher` is `{self.launcher}`"
            )
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("`nodes` lists a node twice")
        targets = [i.mount.rstrip("/") or "/" for i in self.inputs]
        out = self.outputs.path.rstrip("/") or "/"
        for t in [*targets, out]:
            if t == "/":
                raise ValueError("a mount or output path cannot be `/`")
        if len(set(targets)) != len(targets) or out in targets:
            raise ValueError("`inputs` mounts and `outputs.path` must all differ")


class Cancel(_Message, frozen=True, tag="Cancel", kw_only=True):
    """A signed request to stop a queued or running task (same signers as tasks)."""

    id: TaskId
    project: Name
    target: TaskId
    issued_at: UtcTime
    expires_at: UtcTime
    nodes: Annotated[tuple[Name, ...], Meta(min_length=1, max_length=256)]
    issuer: Annotated[str, Meta(max_length=256)] | None = None

    def __post_init__(self) -> None:
        """Check the time window is well-formed."""
        if self.expires_at <= self.issued_at:
            raise ValueError("`expires_at` must be later than `issued_at`")


Manifest = Task | Cancel

_decoder: Final = msgspec.json.Decoder(Manifest)
_encoder: Final = msgspec.json.Encoder()


def decode_manifest(payload: bytes) -> Manifest:
    """Decode a verified payload into a ``Task`` or ``Cancel``.

    Raises:
        ManifestError: not UTF-8 JSON, a duplicate key anywhere, an unknown
            field, a wrong type or value; the message names the field path.
    """
    try:
        refuse_duplicate_keys(payload)
        manifest: Manifest = _decoder.decode(payload)
    except msgspec.ValidationError as e:
        from femd.plain import one_line  # the refusal's words, only when refused

        text = one_line(msgspec.json.decode(payload), Manifest, explain(str(e)))
        raise ManifestError(f"manifest: {text}") from e
    except (msgspec.DecodeError, ValueError) as e:
        raise ManifestError(f"manifest: {cut(explain(str(e)), 200)}") from e
    return manifest


def encode_manifest(manifest: Manifest) -> bytes:
    """Return *manifest* as compact JSON bytes (what ``femd sign`` signs)."""
    return _encoder.encode(manifest)
