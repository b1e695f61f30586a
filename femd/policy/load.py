"""Loading a policy: files, merging, key files, errors at ``file:line``.

Owns ``load_policy()`` (one file or a directory of ``*.yaml`` merged in name
order, key files resolved relative to the policy file), what it yields
(``LoadedPolicy`` with its keys and digest), ``lint_file()`` and
``lint_warnings()``. Does not define the document (``femd.policy.document``)
nor apply it to a task (``femd.decision``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any

import msgspec

from femd.ed25519 import PublicKey
from femd.errors import InputError, PolicyError
from femd.keys import keyid, load_public_key
from femd.policy.document import MaxResources, Policy, Project, default_limits
from femd.policy.problems import lint
from femd.yamlfile import (
    YamlError,
    field_of,
    line_of,
    load_yaml,
)

__all__ = ["LoadedPolicy", "SignerKey", "lint_file", "lint_warnings", "load_policy"]


class SignerKey(msgspec.Struct, frozen=True):
    """A signer's loaded public key."""

    name: str
    keyid: str
    key: PublicKey
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
        d = default_limits()
        return MaxResources(
            cpus=own.cpus or base.cpus or d.cpus,
            memory_mb=own.memory_mb or base.memory_mb or d.memory_mb,
            timeout_s=own.timeout_s or base.timeout_s or d.timeout_s,
            pids=own.pids or base.pids or d.pids,
        )

    def max_output_bytes(self, project: Project) -> int:
        """Return the project's effective outputs cap."""
        return (project.outputs or self.policy.defaults.outputs).max_bytes


class _Doc(msgspec.Struct):
    path: Path
    raw: bytes
    data: Any
    node: Any


def _fail(doc: _Doc, parts: list[str | int], message: str) -> PolicyError:
    """The error at *parts* of *doc*, as ``file:line: field: message``."""
    line = line_of(doc.node, parts)[0]
    return PolicyError(str(doc.path), message, line=line, field=field_of(parts) or None)


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
                            [key, k],
                            f"already defined in {origin[(key, k)].name}",
                        )
                    merged[key][k] = v
                    origin[(key, k)] = doc.path
            elif isinstance(value, list) and isinstance(merged[key], list):
                merged[key] = merged[key] + value
            elif value != merged[key]:
                raise _fail(doc, [key], "differs from an earlier file")
    return merged


def _locate(docs: list[_Doc], parts: list[str | int]) -> _Doc:
    return max(docs, key=lambda d: line_of(d.node, parts)[1])


def _fail_at(docs: list[_Doc], parts: list[str | int], message: str) -> PolicyError:
    """The error at *parts*, in the document that defines them."""
    return _fail(_locate(docs, parts), parts, message)


def _read(path: Path) -> tuple[list[_Doc], Any]:
    """The documents of *path* and their data, merged when there are several."""
    docs = _read_docs(path)
    return docs, _merge(docs) if len(docs) > 1 else docs[0].data


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
            raise _fail(doc, parts, str(e)) from e
        kid = keyid(key)
        if kid in keys:
            raise _fail(
                doc,
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
    docs, data = _read(path)
    try:
        # Without builtin_types msgspec takes YAML dates and quoted strings alike.
        policy = msgspec.convert(data, Policy, strict=True)
    except msgspec.ValidationError as e:
        # Plain words only for a document that fails: not held by an idle agent.
        from femd.plain import first

        parts, message = first(data, Policy, e)
        raise _fail_at(docs, parts, message) from e
    problems = lint(policy)
    if problems:
        p = problems[0]
        raise _fail_at(docs, list(p.path), p.message)
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
        docs, data = _read(path)
        try:
            policy = msgspec.convert(data, Policy, strict=True)
        except msgspec.ValidationError as e:
            from femd.plain import first, problems

            # Every type problem in one pass, not just msgspec's first.
            found = problems(data, Policy) or [first(data, Policy, e)]
            return [str(_fail_at(docs, p, m)) for p, m in found]
        out = [str(_fail_at(docs, list(p.path), p.message)) for p in lint(policy)]
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
        docs, data = _read(path)
        policy = msgspec.convert(data, Policy, strict=True)
    except (PolicyError, msgspec.ValidationError):
        return []
    out = []
    for name, dataset in sorted(policy.datasets.items()):
        if Path(dataset.path).exists():
            continue
        parts: list[str | int] = ["datasets", name, "path"]
        message = (
            f"{dataset.path} does not exist on this host; tasks using dataset "
            f"{name!r} will fail at stage-in (create it or fix the path)"
        )
        out.append(str(_fail_at(docs, parts, message)))
    return out
