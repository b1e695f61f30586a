"""Admission decisions: the node's policy applied to a verified task.

Owns ``Rule``, ``Reason``, ``Decision`` and ``evaluate()``. Pure: no I/O, the
reference time is passed in. Does not verify signatures (``envelope`` does) nor
load policies (``policy`` does); it receives their results.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

__all__ = ["Decision", "Reason", "Rule"]


class Rule(StrEnum):
    """Every rule a task can violate; the value is what auditors and stewards see."""

    SIGNATURE_THRESHOLD = "signature.threshold"
    SIGNER_REVOKED = "signer.revoked"
    SIGNER_EXPIRED = "signer.expired"
    MANIFEST_EXPIRED = "manifest.expired"
    MANIFEST_NOT_YET_VALID = "manifest.not_yet_valid"
    NODE_AUDIENCE = "node.audience"
    PROJECT_UNKNOWN = "project.unknown"
    LAUNCHER_NOT_ALLOWED = "launcher.not_allowed"
    LAUNCHER_UNENFORCEABLE = "launcher.unenforceable"
    IMAGE_NOT_ALLOWED = "image.not_allowed"
    IMAGE_NOT_PINNED = "image.not_pinned"
    GIT_NOT_ALLOWED = "git.not_allowed"
    DATASET_NOT_ALLOWED = "dataset.not_allowed"
    RESOURCES_EXCEEDED = "resources.exceeded"
    NETWORK_NOT_ALLOWED = "network.not_allowed"
    OUTPUTS_EXCEEDED = "outputs.exceeded"


class Reason(msgspec.Struct, frozen=True):
    """One violated rule, with a one-line message in plain words."""

    rule: Rule
    message: str


class Decision(msgspec.Struct, frozen=True):
    """The outcome of admission: allowed exactly when no rule was violated."""

    reasons: tuple[Reason, ...] = ()

    @property
    def allowed(self) -> bool:
        """True when no rule was violated."""
        return not self.reasons
