"""Receiving into an inbox: stage what a receiver took from the broker, commit it.

Owns ``Inbox``: what a message must look like to be kept (a node speaks only
for itself), staging, the one durable ``commit()`` before any ack, the plain
``events.jsonl`` log, result chunks (handed to ``femd.assembly``) and the
record of submitted tasks. Does not talk to the broker (``femd.client``
does).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

from femd.assembly import OutputAssembly, now_text
from femd.errors import cut
from femd.events import TERMINAL_STATES
from femd.inbox import gaps
from femd.inbox.reader import InboxReader

__all__ = ["DEFAULT_MAX_OUTPUT_BYTES", "Inbox"]

logger = logging.getLogger(__name__)

# Above any node's default cap (2 GiB of content plus archive slack).
DEFAULT_MAX_OUTPUT_BYTES: Final = 4 * 1024 * 1024 * 1024


# The shapes of femd.model.Name and TaskId: safe as path parts.
_NODE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TASK: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def _split_key(routing_key: str) -> tuple[str, str] | None:
    """``<node>.<task id>`` (task ids have no dots), or None if malformed."""
    node, _, task = routing_key.rpartition(".")
    if _NODE.fullmatch(node) and _TASK.fullmatch(task):
        return node, task
    return None


class _Decoded(msgspec.Struct, frozen=True):
    node: str
    task_id: str
    state: str
    seq: int
    event_seq: int | None = None
    at: str = ""  # with node and seq, what makes an event one (a redelivery repeats it)


_decode_event = msgspec.json.Decoder(_Decoded).decode


class Inbox(InboxReader):
    """One orchestrator inbox directory; safe for one thread per instance.

    Args:
        root: the directory (created 0700).
        max_output_bytes: the largest archive (and unpacked content) accepted.

    Raises:
        StateError: the database cannot be opened.
    """

    def __init__(
        self, root: Path, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    ) -> None:
        """Open (creating if needed) the inbox at *root*."""
        self.max_output_bytes = max_output_bytes
        self._events: list[tuple[str, int, str, str, str, int | None, str]] = []
        self._nodes: dict[str, str] = {}
        self._logs: list[tuple[str, str, int, int, bytes]] = []
        super().__init__(root)
        self.assembly = OutputAssembly(self, root, max_output_bytes)

    def close(self) -> None:
        """Close open part files and the database."""
        self.assembly.close()
        super().close()

    def stage_event(self, routing_key: str, body: bytes) -> None:
        """Keep a status event for ``commit()``; a malformed one is logged, dropped."""
        try:
            ev = _decode_event(body)
            parsed = json.loads(body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
            logger.warning("inbox: dropping a malformed status event: %s", cut(e))
            return
        # SECURITY: the broker lets a node publish only under its own name
        # (topic permissions); the body must not speak for another node.
        if not isinstance(parsed, dict) or routing_key.rsplit(".", 2)[0] != ev.node:
            logger.warning("inbox: dropping an event routed %s", cut(routing_key))
            return
        text = json.dumps(parsed, sort_keys=True)
        self._events.append(
            (ev.node, ev.seq, ev.task_id, ev.state, text, ev.event_seq, ev.at)
        )

    def stage_node(self, routing_key: str, body: bytes) -> None:
        """Keep a node status for ``commit()`` (the newest per node wins)."""
        try:
            parsed = json.loads(body)
            node = str(parsed["node"])
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("inbox: dropping a malformed node status: %s", cut(e))
            return
        # SECURITY: as for events, a node speaks only for itself.
        if not _NODE.fullmatch(node) or routing_key != f"{node}.status":
            logger.warning("inbox: dropping a node status routed %s", cut(routing_key))
            return
        self._nodes[node] = json.dumps(parsed, sort_keys=True)

    def stage_log(
        self, routing_key: str, headers: Mapping[str, Any], body: bytes
    ) -> None:
        """Keep a live log batch for ``commit()``."""
        key = _split_key(routing_key)
        try:
            seq = int(headers["seq"])
            dropped = int(headers.get("dropped", 0))
        except (KeyError, TypeError, ValueError):
            key = None
        if key is None:
            logger.warning(
                "inbox: dropping a malformed log batch (%s)", cut(routing_key)
            )
            return
        self._logs.append((*key, seq, dropped, body))

    def commit(self) -> None:
        """Make everything staged durable: fsync part files, one transaction.

        Call before acking what was staged. Then verifies and unpacks every
        output whose last chunk this commit brought.

        Raises:
            StateError: the database failed (nothing staged may be acked).
            StageOutError: a part file cannot be synced.
        """
        if not (self._events or self.assembly.staged or self._nodes or self._logs):
            return
        touched = self.assembly.sync()
        now = now_text()
        announced: list[tuple[str, str, dict[str, Any]]] = []
        fresh: list[str] = []
        with self.transaction("commit") as db:
            for node, seq, task, state, text, event_seq, at in self._events:
                # A redelivery is the same (node, seq, at): ignored.
                if db.execute(
                    "INSERT OR IGNORE INTO events (node, seq, task_id, state, body,"
                    " received_at, event_seq, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (node, seq, task, state, text, now, event_seq, at),
                ).rowcount:
                    fresh.append(text)
                    if event_seq is not None:
                        gaps.note(db, node, event_seq, now)
                outputs = json.loads(text).get("outputs")
                if state in TERMINAL_STATES and isinstance(outputs, dict):
                    announced.append((node, task, outputs))
            self.assembly.record(db)
            db.executemany(
                "INSERT INTO nodes (node, body, seen_at) VALUES (?, ?, ?)"
                " ON CONFLICT (node) DO UPDATE SET body = excluded.body,"
                " seen_at = excluded.seen_at",
                [(n, b, now) for n, b in self._nodes.items()],
            )
            db.executemany(
                "INSERT OR IGNORE INTO logs (node, task_id, seq, dropped, body,"
                " received_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(*row, now) for row in self._logs],
            )
        if fresh:
            # A plain log of every event, for tools that read files (jq, FEM).
            with (self.root / "events.jsonl").open("a") as f:
                f.write("".join(line + "\n" for line in fresh))
        self._events.clear()
        self._nodes.clear()
        self._logs.clear()
        for node, task, outputs in announced:
            self.assembly.check_announcement(node, task, outputs)
        for node, task in touched:
            self.assembly.finish_if_complete(node, task)

    def stage_chunk(
        self, routing_key: str, headers: Mapping[str, Any], body: bytes
    ) -> bool:
        """Place a result chunk (see ``OutputAssembly.stage``); False: hand it back.

        Raises:
            StateError: the inbox database failed.
        """
        key = _split_key(routing_key)
        if key is None:
            logger.warning("inbox: dropping a chunk routed %s", cut(routing_key))
            return True
        return self.assembly.stage(*key, headers, body)

    def record_submitted(
        self, task_id: str, kind: str, project: str, nodes: list[str]
    ) -> None:
        """Remember a task this orchestrator submitted (for cancel and listings).

        Raises:
            StateError: the write failed.
        """
        with self.transaction("record submitted") as db:
            db.execute(
                "INSERT OR REPLACE INTO submitted (task_id, kind, project, nodes,"
                " submitted_at) VALUES (?, ?, ?, ?, ?)",
                (task_id, kind, project, json.dumps(nodes), now_text()),
            )
