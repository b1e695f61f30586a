"""The semantic problems of a well-typed policy: ``Problem`` and ``lint()``.

Owns the checks types cannot express: unknown signers, datasets and
runtimes, unreachable thresholds, digests in image patterns, ingress ports
and peers. Reports every problem, never only the first. Does not read files
(``femd.policy.load`` places the problems at ``file:line``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, Literal

import msgspec

from femd.policy.document import NetworkPolicy, Policy
from femd.yamlfile import field_of

__all__ = ["Problem", "lint", "valid_peer"]

_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


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
