"""The wire: what a node tells the orchestrator, and the names it uses.

Owns the message types ``StatusEvent`` (on ``femd.events``) and ``NodeStatus``
(on ``femd.nodes``) with their parts (``Reason``, ``Outputs``, ``RunReport``,
``LauncherStatus``), ``TaskState`` (what a status event's ``state`` says), the
terminal and known state sets, and the broker topology's exchange and queue
names (DESIGN "Broker topology"), so the agent, the orchestrator side and the
CLI spell them once. ``docs/status-event.schema.json`` and
``docs/node-status.schema.json`` are generated from these types
(``wire_schemas()``). The rule ids a ``Reason`` carries are ``rules.Rule``
(policy) and ``rules.EventRule`` (everything else). Builds no message
(``state`` and ``nodestatus`` do) and sends nothing.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final, Literal

import msgspec

from femd.model import json_schema
from femd.usage import Accounting, Traffic, Usage

__all__ = [
    "EVENTS_EXCHANGE",
    "EVENTS_QUEUE",
    "LOGS_EXCHANGE",
    "LOGS_QUEUE",
    "NODES_EXCHANGE",
    "NODES_QUEUE",
    "RESULTS_EXCHANGE",
    "RESULTS_QUEUE",
    "STATES",
    "TASKS_EXCHANGE",
    "TERMINAL_STATES",
    "LauncherStatus",
    "NodeStatus",
    "Outputs",
    "Reason",
    "RunReport",
    "StatusEvent",
    "TaskState",
    "node_queue",
    "wire_schemas",
]


class TaskState(StrEnum):
    """A task's state, as status events and ``femd tasks`` report it."""

    RECEIVED = "received"
    QUEUED = "queued"  # node-local: admitted, waiting for a slot
    STAGING = "staging"
    RUNNING = "running"
    UPLOADING = "uploading"
    REJECTED = "rejected"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


TERMINAL_STATES: Final[frozenset[str]] = frozenset(
    {
        TaskState.REJECTED,
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.TIMED_OUT,
        TaskState.CANCELLED,
    }
)
STATES: Final[frozenset[str]] = frozenset(TaskState)

# Nodes consume tasks from TASKS_EXCHANGE (one queue each) and publish to the
# others; the orchestrator consumes its four queues.
TASKS_EXCHANGE: Final = "femd.tasks"
EVENTS_EXCHANGE: Final = "femd.events"
RESULTS_EXCHANGE: Final = "femd.results"
# Best-effort messages (node status, live task output): not in the outbox.
NODES_EXCHANGE: Final = "femd.nodes"
LOGS_EXCHANGE: Final = "femd.logs"

EVENTS_QUEUE: Final = "femd.orchestrator.events"
RESULTS_QUEUE: Final = "femd.orchestrator.results"
NODES_QUEUE: Final = "femd.orchestrator.nodes"
LOGS_QUEUE: Final = "femd.orchestrator.logs"


def node_queue(node: str) -> str:
    """Return the name of *node*'s task queue."""
    return f"femd.node.{node}"


# ---------------------------------------------------------------------------
# messages


class _Wire(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of what a node sends: immutable; an absent optional field is left out.

    Unknown fields are not refused: a receiver keeps reading what a newer
    node sends.
    """


class Reason(_Wire, frozen=True):
    """Why a task was refused or did not succeed: one rule id, one line.

    ``rule`` is a rule id of DESIGN "Decisions and rule ids" (``area.name``,
    e.g. ``image.not_allowed``, ``task.failed``); ``message`` says what was
    wrong in plain words.
    """

    rule: str
    message: str


class Outputs(_Wire, frozen=True):
    """The packed outputs of a task, sent as chunks on ``femd.results``.

    ``sha256`` and ``bytes`` of the whole ``tar.gz``; ``chunks``: how many
    chunk messages carry it.
    """

    sha256: str
    bytes: int
    chunks: int


class RunReport(_Wire, frozen=True):
    """What the terminal event of a task that ran tells of the run.

    ``log_tail``: the last few KiB of its output; ``started_at``: when the
    workload started (RFC 3339 UTC); ``accounting``: what a batch system
    measured (slurm); ``network``: what femd forwarded for the task, per
    destination or ingress port.
    """

    log_tail: str | None = None
    started_at: str | None = None
    accounting: Accounting | None = None
    network: tuple[Traffic, ...] = ()


class StatusEvent(_Wire, frozen=True):
    """One change of one task on one node (JSON on ``femd.events``).

    Routed ``<node>.<task_id>.<state>``. ``at``: when it happened (RFC 3339
    UTC, microseconds). ``seq``: the node's outbox sequence, shared with the
    result chunks: increasing, with gaps, unique per node and state database
    (receivers dedupe on node, ``seq`` and ``at``: a node with a new state
    database numbers from 1 again). ``event_seq``: the node's status event
    sequence: 1, 2, 3, ... with no gap on ``femd.events`` alone, so a
    receiver that misses a number has lost an event (absent from nodes older
    than this field; starts again at 1 with a new state database).
    ``task_id`` is ``unverified`` for input that never became a task. The
    other fields are present only when they say something: ``reasons``
    (rejected, failed, ...), ``exit_code``, ``outputs`` and ``usage`` (what
    the task used, as measured), then the run report.
    """

    node: str
    task_id: str
    state: TaskState
    at: str
    seq: int
    event_seq: int | None = None
    exit_code: int | None = None
    reasons: tuple[Reason, ...] = ()
    outputs: Outputs | None = None
    usage: Usage | None = None
    log_tail: str | None = None
    started_at: str | None = None
    accounting: Accounting | None = None
    network: tuple[Traffic, ...] = ()


class LauncherStatus(_Wire, frozen=True):
    """One (profile, launcher) of a node and what it can enforce there."""

    profile: str
    launcher: str
    available: bool
    memory_limit: bool
    cpu_limit: bool
    pids_limit: bool
    egress: bool
    egress_filtered: bool
    problems: tuple[str, ...]


class NodeStatus(_Wire, frozen=True):
    """A node's status (JSON on ``femd.nodes``, routed ``<node>.status``).

    Sent at start, after a policy reload, every ``interval_s`` and once more
    when stopping (``state: stopping``); best effort, a newer one supersedes
    a lost one. ``at``: when it was built (RFC 3339 UTC); ``version``: femd's;
    ``policy_sha256``: of the policy in force; ``running`` and ``queued``
    tasks; ``disk_free_bytes`` of the state directory and the client
    certificate's ``cert_not_after`` (null when unknown).
    """

    node: str
    state: Literal["up", "stopping"]
    at: str
    version: str
    policy_sha256: str
    launchers: tuple[LauncherStatus, ...]
    running: int
    queued: int
    disk_free_bytes: int | None
    cert_not_after: str | None
    interval_s: float


def wire_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas shipped in ``docs/``, by file name."""
    return {
        "status-event.schema.json": json_schema(StatusEvent),
        "node-status.schema.json": json_schema(NodeStatus),
    }
