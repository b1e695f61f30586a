"""Admission decisions: the node's policy applied to a verified task.

Owns ``evaluate()`` and ``admit()`` (the whole trust kernel: envelope,
signatures, manifest, rules) and ``Verdict``. Pure: no I/O, the reference
time is passed in. Does not verify signatures (``envelope`` does) nor load
policies (``policy`` does); it receives their results. The rule ids,
``Reason`` and ``Decision`` are ``rules``'s, the globs ``patterns``'s; both
are re-exported here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec

from femd.envelope import (
    MAX_ENVELOPE_BYTES,
    SignatureCheck,
    check_signatures,
    decode_envelope,
)
from femd.errors import cut
from femd.manifest import Manifest, NetworkNone, Task, decode_manifest
from femd.patterns import glob_match, split_image
from femd.policy import LoadedPolicy, Project
from femd.rules import Decision, EventRule, Reason, Rule

__all__ = [
    "Decision",
    "EventRule",
    "Reason",
    "Rule",
    "Verdict",
    "admit",
    "evaluate",
    "glob_match",
    "split_image",
]


class Verdict(msgspec.Struct, frozen=True):
    """Everything admission learned about one envelope.

    ``manifest`` is None when no trusted key signed (the payload was never
    decoded). ``signers`` are the policy names of the keys that counted.
    """

    decision: Decision
    manifest: Manifest | None
    check: SignatureCheck
    signers: tuple[str, ...]
    keyids: tuple[str, ...]
    payload: bytes
    manifest_sha256: str


def _usable(check: SignatureCheck, policy: LoadedPolicy, now: datetime) -> set[str]:
    today = now.astimezone(UTC).date()
    usable = set()
    for k in check.valid:
        expires = policy.keys[k].expires
        if k not in policy.revoked and (expires is None or today <= expires):
            usable.add(k)
    return usable


def _signer_reasons(
    check: SignatureCheck, policy: LoadedPolicy, now: datetime
) -> Iterable[Reason]:
    today = now.astimezone(UTC).date()
    for k in sorted(check.valid):
        name = policy.keys[k].name
        if k in policy.revoked:
            yield Reason(
                Rule.SIGNER_REVOKED, f"signer {name!r} (key {k[:16]}) is revoked"
            )
        elif (exp := policy.keys[k].expires) is not None and today > exp:
            yield Reason(Rule.SIGNER_EXPIRED, f"signer {name!r} expired on {exp}")


class _Ctx(msgspec.Struct, frozen=True):
    manifest: Manifest
    project: Project | None
    usable: frozenset[str]
    policy: LoadedPolicy
    node: str
    now: datetime
    skew: timedelta


def _threshold(c: _Ctx) -> Iterable[Reason]:
    if c.project is None:
        return
    listed = c.project.signers
    got = sorted({c.policy.keys[k].name for k in c.usable} & set(listed))
    if len(got) < c.project.threshold:
        yield Reason(
            Rule.SIGNATURE_THRESHOLD,
            f"needs {c.project.threshold} of [{', '.join(listed)}], got {len(got)}"
            + (f" ({', '.join(got)})" if got else ""),
        )


def _window(c: _Ctx) -> Iterable[Reason]:
    m = c.manifest
    # Differences, not sums: `expires_at + skew` overflows for a signed 9999-12-31.
    if c.now - m.expires_at > c.skew:
        yield Reason(Rule.MANIFEST_EXPIRED, f"expired at {_iso(m.expires_at)}")
    if m.issued_at - c.now > c.skew:
        yield Reason(
            Rule.MANIFEST_NOT_YET_VALID, f"issued in the future ({_iso(m.issued_at)})"
        )


def _audience(c: _Ctx) -> Iterable[Reason]:
    if c.node not in c.manifest.nodes:
        yield Reason(
            Rule.NODE_AUDIENCE,
            f"node {c.node!r} is not in the task's nodes "
            f"[{', '.join(c.manifest.nodes)}]",
        )
    if c.node != c.policy.policy.node:
        yield Reason(
            Rule.NODE_AUDIENCE,
            f"this policy is for node {c.policy.policy.node!r}, not {c.node!r}",
        )


def _project(c: _Ctx) -> Iterable[Reason]:
    if c.project is None:
        yield Reason(
            Rule.PROJECT_UNKNOWN, f"project {c.manifest.project!r} is not in the policy"
        )


def _launcher(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if isinstance(t, Task) and c.project and t.launcher not in c.project.launchers:
        allowed = ", ".join(c.project.launchers) or "none"
        yield Reason(
            Rule.LAUNCHER_NOT_ALLOWED,
            f"launcher {t.launcher!r} is not allowed (allowed: {allowed})",
        )


def _image(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if not isinstance(t, Task) or c.project is None or t.image is None:
        return
    repository, digest = split_image(t.image)
    if digest is None:
        yield Reason(
            Rule.IMAGE_NOT_PINNED,
            f"image {cut(t.image)} is not pinned by @sha256 digest",
        )
    if not any(glob_match(p, repository) for p in c.project.images):
        yield Reason(
            Rule.IMAGE_NOT_ALLOWED, f"image repository {cut(repository)} is not allowed"
        )


def _git(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if (
        isinstance(t, Task)
        and c.project
        and t.source is not None
        and not any(glob_match(p, t.source.git) for p in c.project.git)
    ):
        yield Reason(
            Rule.GIT_NOT_ALLOWED,
            f"git repository {cut(t.source.git)} is not allowed",
        )


def _datasets(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if not isinstance(t, Task) or c.project is None:
        return
    for i in t.inputs:
        if (
            i.dataset not in c.project.datasets
            or i.dataset not in c.policy.policy.datasets
        ):
            yield Reason(
                Rule.DATASET_NOT_ALLOWED, f"dataset {i.dataset!r} is not allowed"
            )


def _runtime(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if not isinstance(t, Task) or c.project is None or t.runtime is None:
        return
    if t.runtime not in c.project.runtimes or t.runtime not in c.policy.policy.runtimes:
        yield Reason(Rule.RUNTIME_NOT_ALLOWED, f"runtime {t.runtime!r} is not allowed")


def _resources(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if not isinstance(t, Task) or c.project is None:
        return
    limits = c.policy.limits(c.project)
    for name in ("cpus", "memory_mb", "timeout_s", "pids"):
        asked, most = getattr(t.resources, name), getattr(limits, name)
        if asked is not None and asked > most:
            yield Reason(
                Rule.RESOURCES_EXCEEDED,
                f"{name} {asked:g} exceeds the maximum {most:g}",
            )


def _network(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if not isinstance(t, Task) or c.project is None:
        return
    net = c.project.network
    egress = () if net == "none" else net.egress or ()
    if not isinstance(t.network, NetworkNone):
        for hp in t.network.allow:
            if not any(glob_match(p, hp) for p in egress):
                yield Reason(Rule.NETWORK_NOT_ALLOWED, f"egress to {hp} is not allowed")
    ports = () if net == "none" or net.ingress is None else net.ingress.ports
    for port in t.network.listen:
        if port not in ports:
            yield Reason(
                Rule.NETWORK_NOT_ALLOWED, f"listening on port {port} is not allowed"
            )


def _outputs(c: _Ctx) -> Iterable[Reason]:
    t = c.manifest
    if not isinstance(t, Task) or c.project is None or t.outputs.max_bytes is None:
        return
    most = c.policy.max_output_bytes(c.project)
    if t.outputs.max_bytes > most:
        yield Reason(
            Rule.OUTPUTS_EXCEEDED,
            f"outputs max_bytes {t.outputs.max_bytes} exceeds {most}",
        )


_RULES: Final[tuple[Callable[[_Ctx], Iterable[Reason]], ...]] = (
    _project,
    _threshold,
    _window,
    _audience,
    _launcher,
    _image,
    _git,
    _datasets,
    _runtime,
    _resources,
    _network,
    _outputs,
)


def evaluate(
    manifest: Manifest,
    check: SignatureCheck,
    policy: LoadedPolicy,
    *,
    node: str,
    now: datetime,
    skew_s: float = 300,
) -> Decision:
    """Apply every rule to a decoded manifest; return all violations (default deny)."""
    ctx = _Ctx(
        manifest=manifest,
        project=policy.policy.projects.get(manifest.project),
        usable=frozenset(_usable(check, policy, now)),
        policy=policy,
        node=node,
        now=now,
        skew=timedelta(seconds=skew_s),
    )
    reasons = list(_signer_reasons(check, policy, now))
    for rule in _RULES:
        reasons.extend(rule(ctx))
    return Decision(tuple(reasons))


def admit(
    data: bytes,
    policy: LoadedPolicy,
    *,
    node: str,
    now: datetime,
    skew_s: float = 300,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> Verdict:
    """Verify an envelope and decide on it: the whole trust kernel, no I/O.

    Steps (DESIGN "signed envelope"): 1. decode the envelope strictly;
    2. verify every signature over PAE of the raw payload bytes; 3. stop with a
    deny, without decoding the payload, unless a trusted, unrevoked, unexpired
    key signed; 4. decode the manifest strictly; 5. evaluate every rule.

    Raises:
        EnvelopeError: the envelope is malformed.
        ManifestError: a trusted key signed a malformed manifest.
    """
    env, payload = decode_envelope(data, max_bytes=max_bytes)
    trusted = {k: sk.key for k, sk in policy.keys.items()}
    check = check_signatures(env, payload, trusted)
    digest = hashlib.sha256(payload).hexdigest()
    usable = _usable(check, policy, now)
    if not usable:
        # SECURITY: untrusted bytes are never parsed beyond the envelope.
        reasons = [*_signer_reasons(check, policy, now)]
        reasons.append(Reason(Rule.SIGNATURE_THRESHOLD, _no_trusted(check)))
        return Verdict(Decision(tuple(reasons)), None, check, (), (), payload, digest)
    manifest = decode_manifest(payload)
    decision = evaluate(manifest, check, policy, node=node, now=now, skew_s=skew_s)
    project = policy.policy.projects.get(manifest.project)
    counted = sorted(
        k for k in usable if project and policy.keys[k].name in project.signers
    )
    names = tuple(policy.keys[k].name for k in counted)
    return Verdict(decision, manifest, check, names, tuple(counted), payload, digest)


def _no_trusted(check: SignatureCheck) -> str:
    parts = []
    if check.invalid:
        parts.append(f"{len(check.invalid)} bad")
    if check.unknown:
        parts.append(f"{len(check.unknown)} from unknown keys")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"no valid signature by a trusted key{detail}"


def _iso(t: datetime) -> str:
    try:
        return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00 is past year 9999 in UTC
        return t.isoformat()
