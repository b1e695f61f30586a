"""The node's policy, written by its data stewards: types, loading, lint.

Owns the policy document (``kind: Policy``), ``load_policy()`` (one file or a
directory of ``*.yaml`` merged in name order, key files resolved relative to
the policy file) and ``lint()``. Errors name the file, line and field. Applying
the policy to a task is ``decision``'s business.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import re
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from msgspec import Meta

from femd.errors import InputError, PolicyError
from femd.keys import keyid, load_public_key
from femd.model import (
    AbsPath,
    HostPortPattern,
    KeyId,
    LauncherName,
    Name,
    Peer,
    Port,
    Strict,
    unknown_launcher,
)
from femd.plain import first, problems
from femd.yamlfile import (
    YamlError,
    field_of,
    line_of,
    load_yaml,
)

__all__ = [
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_PIDS",
    "DEFAULT_TIMEOUT_S",
    "Dataset",
    "Defaults",
    "IngressPolicy",
    "LoadedPolicy",
    "MaxResources",
    "NetworkPolicy",
    "OutputsPolicy",
    "Policy",
    "Problem",
    "Project",
    "Runtime",
    "Signer",
    "SignerKey",
    "lint",
    "lint_file",
    "lint_warnings",
    "load_policy",
    "policy_schema",
    "valid_peer",
]

_Pattern = Annotated[str, Meta(min_length=1, max_length=512)]
_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


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


def _default_limits() -> MaxResources:
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

    max_resources: MaxResources = msgspec.field(default_factory=_default_limits)
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


class SignerKey(msgspec.Struct, frozen=True):
    """A signer's loaded public key."""

    name: str
    keyid: str
    key: Ed25519PublicKey
    expires: date | None


class LoadedPolicy(msgspec.Struct, frozen=True):
    """A validated policy with its keys loaded; what the agent and `check` use.

    ``sha256`` covers every file read (policy files and key files).
    """

    policy: Policy
    keys: Mapping[str, SignerKey]
    sha256: str
    source: str

    @property
    def revoked(self) -> frozenset[str]:
        """Keyids that never count."""
        return frozenset(self.policy.revoked_keyids)

    def limits(self, project: Project) -> MaxResources:
        """Return the project's effective maxima (defaults fill the gaps)."""
        base = self.policy.defaults.max_resources
        own = project.max_resources or MaxResources()
        d = _default_limits()
        return MaxResources(
            cpus=own.cpus or base.cpus or d.cpus,
            memory_mb=own.memory_mb or base.memory_mb or d.memory_mb,
            timeout_s=own.timeout_s or base.timeout_s or d.timeout_s,
            pids=own.pids or base.pids or d.pids,
        )

    def max_output_bytes(self, project: Project) -> int:
        """Return the project's effective outputs cap."""
        return (project.outputs or self.policy.defaults.outputs).max_bytes


class Problem(msgspec.Struct, frozen=True):
    """One semantic problem of a policy, at a dotted field path."""

    path: tuple[str | int, ...]
    message: str

    @property
    def field(self) -> str:
        """Dotted field name."""
        return field_of(list(self.path))


def lint(policy: Policy) -> list[Problem]:
    """Return every semantic problem of a well-typed policy (empty when clean)."""
    problems: list[Problem] = []
    for name, project in policy.projects.items():
        at: tuple[str | int, ...] = ("projects", name)
        for i, signer in enumerate(project.signers):
            if signer not in policy.signers:
                problems.append(
                    Problem((*at, "signers", i), f"unknown signer {signer!r}")
                )
        if len(set(project.signers)) != len(project.signers):
            problems.append(Problem((*at, "signers"), "a signer is listed twice"))
        if project.threshold > len(set(project.signers)):
            problems.append(
                Problem(
                    (*at, "threshold"),
                    f"needs {project.threshold} signatures but only "
                    f"{len(set(project.signers))} signers are listed",
                )
            )
        for i, ds in enumerate(project.datasets):
            if ds not in policy.datasets:
                problems.append(
                    Problem((*at, "datasets", i), f"unknown dataset {ds!r}")
                )
        for i, rt in enumerate(project.runtimes):
            if rt not in policy.runtimes:
                problems.append(
                    Problem((*at, "runtimes", i), f"unknown runtime {rt!r}")
                )
        for i, pattern in enumerate(project.images):
            if "@" in pattern:
                problems.append(
                    Problem(
                        (*at, "images", i),
                        "an image pattern matches the repository only; "
                        "leave out the `@sha256:` digest",
                    )
                )
        problems += _lint_network(at, project.network)
    return problems


def _lint_network(
    at: tuple[str | int, ...], network: Literal["none"] | NetworkPolicy
) -> list[Problem]:
    if network == "none" or network.ingress is None:
        return []
    problems: list[Problem] = []
    ingress = network.ingress
    where = (*at, "network", "ingress")
    if len(set(ingress.ports)) != len(ingress.ports):
        problems.append(Problem((*where, "ports"), "a port is listed twice"))
    for i, peer in enumerate(ingress.peers):
        if not valid_peer(peer):
            problems.append(
                Problem(
                    (*where, "peers", i),
                    f"not a CIDR, address or host name: {peer!r}",
                )
            )
    return problems


def valid_peer(peer: str) -> bool:
    """True when *peer* is a CIDR, an IP address or a DNS host name."""
    try:
        ipaddress.ip_network(peer, strict=True)
    except ValueError:
        pass
    else:
        return True
    labels = peer.split(".")
    return len(peer) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _dedent(node: Any) -> Any:  # noqa: ANN401 (JSON)
    # Python 3.13 dedents docstrings itself, 3.11 does not: the shipped schema must
    # not depend on the interpreter that printed it.
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v)
            if k == "description" and isinstance(v, str)
            else _dedent(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_dedent(v) for v in node]
    return node


def policy_schema() -> dict[str, Any]:
    """Return the policy's JSON Schema, generated from the types above."""
    schema: dict[str, Any] = _dedent(msgspec.json.schema(Policy))
    return schema


# ---------------------------------------------------------------------------
# loading


class _Doc(msgspec.Struct):
    path: Path
    raw: bytes
    data: Any
    node: Any


def _fail(
    doc: _Doc | None, where: str, parts: list[str | int], message: str
) -> PolicyError:
    line = line_of(doc.node, parts)[0] if doc is not None else None
    return PolicyError(where, message, line=line, field=field_of(parts) or None)


def _read_docs(path: Path) -> list[_Doc]:
    try:
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.suffix == ".yaml" and p.is_file()
            )
            if not files:
                raise PolicyError(str(path), "directory holds no *.yaml policy file")
        else:
            files = [path]
        docs = []
        for f in files:
            raw = f.read_bytes()
            try:
                data, node = load_yaml(raw)
            except YamlError as e:
                raise PolicyError(str(f), e.message, line=e.line) from e
            if not isinstance(data, dict):
                raise PolicyError(str(f), "expected a mapping at the top level", line=1)
            docs.append(_Doc(f, raw, data, node))
    except OSError as e:
        raise PolicyError(str(e.filename or path), e.strerror or "cannot read") from e
    return docs


def _merge(docs: list[_Doc]) -> dict[str, Any]:
    """Merge documents in name order (DESIGN "config": a directory of *.yaml)."""
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, str], Path] = {}
    for doc in docs:
        for key, value in doc.data.items():
            if key not in merged:
                merged[key] = dict(value) if isinstance(value, dict) else value
                if isinstance(value, dict):
                    origin.update({(key, k): doc.path for k in value})
            elif isinstance(value, dict) and isinstance(merged[key], dict):
                for k, v in value.items():
                    if k in merged[key]:
                        raise _fail(
                            doc,
                            str(doc.path),
                            [key, k],
                            f"already defined in {origin[(key, k)].name}",
                        )
                    merged[key][k] = v
                    origin[(key, k)] = doc.path
            elif isinstance(value, list) and isinstance(merged[key], list):
                merged[key] = merged[key] + value
            elif value != merged[key]:
                raise _fail(doc, str(doc.path), [key], "differs from an earlier file")
    return merged


def _locate(docs: list[_Doc], parts: list[str | int]) -> _Doc:
    return max(docs, key=lambda d: line_of(d.node, parts)[1])


def _load_keys(
    policy: Policy, docs: list[_Doc], base: Path
) -> tuple[dict[str, SignerKey], list[bytes]]:
    keys: dict[str, SignerKey] = {}
    blobs: list[bytes] = []
    for name, signer in policy.signers.items():
        parts: list[str | int] = ["signers", name]
        doc = _locate(docs, parts)
        try:
            if signer.public_key_file is not None:
                parts.append("public_key_file")
                file = base / signer.public_key_file
                try:
                    pem = file.read_bytes()
                except OSError as e:
                    raise InputError(f"cannot read {file}: {e.strerror}") from e
            else:
                parts.append("public_key")
                pem = (signer.public_key or "").encode()
            key = load_public_key(pem, "key")
        except InputError as e:
            raise _fail(doc, str(doc.path), parts, str(e)) from e
        kid = keyid(key)
        if kid in keys:
            raise _fail(
                doc,
                str(doc.path),
                parts,
                f"same key as signer {keys[kid].name!r} (a key counts once)",
            )
        keys[kid] = SignerKey(name=name, keyid=kid, key=key, expires=signer.expires)
        blobs.append(pem)
    return keys, blobs


def load_policy(path: Path) -> LoadedPolicy:
    """Load, validate and lint a policy file or directory; load its keys.

    Raises:
        PolicyError: the first problem, as ``file:line: field: message``.
    """
    docs = _read_docs(path)
    data = _merge(docs) if len(docs) > 1 else docs[0].data
    try:
        # Without builtin_types msgspec takes YAML dates and quoted strings alike.
        policy = msgspec.convert(data, Policy, strict=True)
    except msgspec.ValidationError as e:
        parts, message = first(data, Policy, e)
        doc = _locate(docs, parts)
        raise _fail(doc, str(doc.path), parts, message) from e
    problems = lint(policy)
    if problems:
        p = problems[0]
        doc = _locate(docs, list(p.path))
        raise _fail(doc, str(doc.path), list(p.path), p.message)
    base = path if path.is_dir() else path.parent
    keys, blobs = _load_keys(policy, docs, base)
    digest = hashlib.sha256()
    for blob in [d.raw for d in docs] + blobs:
        digest.update(hashlib.sha256(blob).digest())
    return LoadedPolicy(
        policy=policy, keys=keys, sha256=digest.hexdigest(), source=str(path)
    )


def lint_file(path: Path) -> list[str]:
    """Return every problem of a policy file as ``file:line: field: message`` lines.

    A policy that cannot be typed at all yields its one decoding error.
    """
    try:
        docs = _read_docs(path)
        data = _merge(docs) if len(docs) > 1 else docs[0].data
        try:
            policy = msgspec.convert(data, Policy, strict=True)
        except msgspec.ValidationError as e:
            # Every type problem in one pass, not just msgspec's first.
            found = problems(data, Policy) or [first(data, Policy, e)]
            located = [(_locate(docs, p), p, m) for p, m in found]
            return [str(_fail(d, str(d.path), p, m)) for d, p, m in located]
        out = []
        for p in lint(policy):
            doc = _locate(docs, list(p.path))
            out.append(str(_fail(doc, str(doc.path), list(p.path), p.message)))
        if out:
            return out
        load_policy(path)
    except PolicyError as e:
        return [str(e)]
    return []


def lint_warnings(path: Path) -> list[str]:
    """Problems that do not make a policy invalid but will refuse tasks.

    Today: a dataset whose path does not exist on this host (a task using it
    fails at stage-in). Returns ``file:line: field: message`` lines; a policy
    that does not load yields none here (``lint_file`` reports it).
    """
    try:
        docs = _read_docs(path)
        data = _merge(docs) if len(docs) > 1 else docs[0].data
        policy = msgspec.convert(data, Policy, strict=True)
    except (PolicyError, msgspec.ValidationError):
        return []
    out = []
    for name, dataset in sorted(policy.datasets.items()):
        if Path(dataset.path).exists():
            continue
        parts: list[str | int] = ["datasets", name, "path"]
        doc = _locate(docs, parts)
        message = (
            f"{dataset.path} does not exist on this host; tasks using dataset "
            f"{name!r} will fail at stage-in (create it or fix the path)"
        )
        out.append(str(_fail(doc, str(doc.path), parts, message)))
    return out
