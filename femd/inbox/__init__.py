"""The orchestrator's durable inbox: everything its identity receives, on disk.

Owns one directory (``results_dir`` of the orchestrator config, ``--inbox``):

- ``inbox.sqlite`` (WAL): status events (one per node, ``seq`` and ``at``) and the
  holes in each node's ``event_seq`` numbering, the
  announced outputs and which of their chunks are in, node status, live log
  batches, and the tasks this orchestrator submitted;
- ``parts/<node>/<task>.part``: outputs being received, each chunk written at
  its offset as it comes (memory stays at one chunk whatever the size);
- ``<node>/<task>.tar.gz`` and ``<node>/<task>/``: verified (sha256 of the
  whole) and safely unpacked outputs;
- ``events.jsonl``: every status event once, one JSON object a line.

What a receiver took from the broker is ``stage()``d, then ``commit()``ted
(file data fsynced, rows in one transaction) and only then acked, so a killed
receiver loses nothing: the broker redelivers and duplicates are ignored. Any
number of receivers (processes) may share the directory; whoever commits the
last chunk of an output verifies and unpacks it. Reading is for everyone:
``femd watch``, ``femd tasks --orchestrator``, ``femd nodes``. Does not talk
to the broker (``femd.client`` does) nor decide anything.

Modules: ``database`` (schema, opening, transactions), ``reader`` (the
records and their queries), ``staging`` (``Inbox``: stage and commit),
``gaps`` (lost status events).
"""

from femd.inbox.gaps import EventGap
from femd.inbox.reader import (
    LogBatch,
    NodeSeen,
    OutputStatus,
    StoredEvent,
    TaskSummary,
)
from femd.inbox.staging import DEFAULT_MAX_OUTPUT_BYTES, Inbox

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "EventGap",
    "Inbox",
    "LogBatch",
    "NodeSeen",
    "OutputStatus",
    "StoredEvent",
    "TaskSummary",
]
