"""What admission decisions are made of: rule ids, ``Reason``, ``Decision``.

Owns every rule id a denial or a status event can carry (``Rule`` for the
policy's rules, ``EventRule`` for the others) and the value a decision is.
Pure: no I/O. Does not apply any rule (``decision`` does; launchers add
``launcher.unenforceable`` and ``mount.reserved``).
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

__all__ = ["Decision", "EventRule", "Reason", "Rule"]


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
    MOUNT_RESERVED = "mount.reserved"
    IMAGE_NOT_ALLOWED = "image.not_allowed"
    IMAGE_NOT_PINNED = "image.not_pinned"
    GIT_NOT_ALLOWED = "git.not_allowed"
    DATASET_NOT_ALLOWED = "dataset.not_allowed"
    RUNTIME_NOT_ALLOWED = "runtime.not_allowed"
    RESOURCES_EXCEEDED = "resources.exceeded"
    NETWORK_NOT_ALLOWED = "network.not_allowed"
    OUTPUTS_EXCEEDED = "outputs.exceeded"


class EventRule(StrEnum):
    """Every other rule id a status event's ``reasons`` carry (not a policy rule).

    ``input.*``: a message rejected before any policy rule could apply;
    ``task.<state>``: how a task ended when no limit says more (``ended()``);
    ``task.replayed`` / ``agent.restarted``: what recovery found.
    """

    INPUT_AMQP = "input.amqp"
    INPUT_ENVELOPE = "input.envelope"
    INPUT_MANIFEST = "input.manifest"
    TASK_REPLAYED = "task.replayed"
    AGENT_RESTARTED = "agent.restarted"
    TASK_FAILED = "task.failed"
    TASK_TIMED_OUT = "task.timed_out"
    TASK_CANCELLED = "task.cancelled"

    @classmethod
    def ended(cls, state: str) -> EventRule:
        """The rule of a task that ended in *state* (failed, timed_out, cancelled).

        Raises:
            ValueError: *state* is not such a state (a bug).
        """
        return cls(f"task.{state}")


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
