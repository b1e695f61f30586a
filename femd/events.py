"""The names on the wire: task states, exchanges and queues.

Owns ``TaskState`` (what a status event's ``state`` says), the terminal and
known state sets, and the broker topology's exchange and queue names (DESIGN
"Broker topology"), so the agent, the orchestrator side and the CLI spell
them once. The rule ids an event's ``reasons`` carry are ``decision.Rule``
(policy) and ``decision.EventRule`` (everything else).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

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
    "TaskState",
    "node_queue",
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
