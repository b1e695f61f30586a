"""One task as the state database keeps it: ``TaskRow`` and reading its row.

Owns the ``tasks`` table's column list (``COLUMNS``, in the order every
query selects them) and ``task_row()``, which turns one such row into a
``TaskRow`` or refuses it as malformed. ``State`` writes and queries the
rows; ``femd tasks`` shows them.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Final, Literal

import msgspec

from femd.errors import StateError, cut
from femd.statedb import parse_time

__all__ = ["COLUMNS", "TaskRow", "task_row"]

COLUMNS: Final = (
    "task_id, project, kind, state, decision, reasons, manifest_sha256, payload, "
    "signer_keyids, launcher, received_at, updated_at, exit_code, output_sha256, "
    "output_bytes, output_chunks, error, usage"
)


class TaskRow(msgspec.Struct, frozen=True):
    """One task as the node recorded it, with its latest state."""

    task_id: str
    project: str
    kind: str
    state: str
    decision: Literal["allow", "deny"] | None
    reasons: tuple[tuple[str, str], ...]
    manifest_sha256: str
    payload: bytes | None
    signer_keyids: tuple[str, ...]
    launcher: str | None
    received_at: datetime
    updated_at: datetime
    exit_code: int | None
    output_sha256: str | None
    output_bytes: int | None
    output_chunks: int | None
    error: str | None
    usage: dict[str, float] | None = None


class _ReasonJson(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rule: str
    message: str


_decode_reasons = msgspec.json.Decoder(tuple[_ReasonJson, ...]).decode
_decode_keyids = msgspec.json.Decoder(tuple[str, ...]).decode


def task_row(row: tuple[object, ...]) -> TaskRow:
    """Convert one ``COLUMNS`` row; a malformed row is a ``StateError``."""
    try:
        reasons = _decode_reasons(str(row[5]))
        keyids = _decode_keyids(str(row[8]))
        return msgspec.convert(
            {
                "task_id": row[0],
                "project": row[1],
                "kind": row[2],
                "state": row[3],
                "decision": row[4],
                "reasons": [(r.rule, r.message) for r in reasons],
                "manifest_sha256": row[6],
                "payload": row[7],
                "signer_keyids": keyids,
                "launcher": row[9],
                "received_at": parse_time(str(row[10])),
                "updated_at": parse_time(str(row[11])),
                "exit_code": row[12],
                "output_sha256": row[13],
                "output_bytes": row[14],
                "output_chunks": row[15],
                "error": row[16],
                "usage": json.loads(str(row[17])) if row[17] is not None else None,
            },
            TaskRow,
            strict=True,
        )
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError) as e:
        raise StateError(f"state: malformed task row {cut(row[0])}: {cut(e)}") from e
