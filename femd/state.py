"""Durable node state: tasks, their transitions and their status events.

Owns the ``tasks`` and ``transitions`` tables of ``state_dir/state.sqlite``
(the connection and schema are ``statedb``'s, the outbox ``outbox``'s,
reading a row ``taskrow``'s).
Every change is one short transaction that also queues the status event
telling it, so what a method returned is on disk with its event.

One writer (the agent's main thread) and any number of readers (``femd tasks``
in another process) may use the file at once. Does not decide, publish, audit
or run anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final, Literal

import msgspec

from femd.errors import StateError, cut, printable
from femd.events import (
    EVENTS_EXCHANGE,
    RESULTS_EXCHANGE,
    STATES,
    TERMINAL_STATES,
    Outputs,
    Reason,
    RunReport,
    StatusEvent,
    TaskState,
)
from femd.outbox import Outbox, OutboxEvent, Results, chunk_rows
from femd.statedb import parse_time, time_text
from femd.taskrow import COLUMNS, TaskRow, task_row
from femd.usage import Usage

__all__ = [
    "EVENTS_EXCHANGE",
    "RESULTS_EXCHANGE",
    "STATES",
    "TERMINAL_STATES",
    "OutboxEvent",
    "Results",
    "State",
    "TaskRow",
]

logger = logging.getLogger(__name__)

_INSERT_TRANSITION: Final = (
    "INSERT INTO transitions (task_id, state, at, detail) VALUES (?, ?, ?, ?)"
)


def _wire_reasons(reasons: Sequence[tuple[str, str]]) -> tuple[Reason, ...]:
    # Messages may quote file names or tool output that are not UTF-8.
    return tuple(
        Reason(rule=printable(rule), message=printable(message))
        for rule, message in reasons
    )


def _reasons_text(reasons: Sequence[tuple[str, str]]) -> str:
    """The ``reasons`` column: the event's reasons as JSON."""
    return msgspec.json.encode(_wire_reasons(reasons)).decode()


def _event(node: str, task_id: str, state: TaskState, at: str) -> StatusEvent:
    """A status event without its sequence numbers (``_emit`` sets them)."""
    return StatusEvent(node=node, task_id=task_id, state=state, at=at, seq=0)


def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"state: unknown task state {state!r}")


class State(Outbox):
    """The node's sqlite state; safe for one writer thread plus readers.

    Args:
        path: the database file, normally ``StateDir.db``.

    Raises:
        StateError: the file cannot be opened or created, is not a femd state
            database, or has an unsupported schema version.
    """

    def record(
        self,
        *,
        task_id: str,
        project: str,
        kind: str,
        manifest_sha256: str,
        payload: bytes | None,
        signer_keyids: Sequence[str],
        launcher: str | None,
        decision: Literal["allow", "deny"],
        reasons: Sequence[tuple[str, str]],
        node: str,
        at: datetime,
    ) -> bool:
        """Record a newly received task and its decision, exactly once.

        In one transaction: the task row, its ``received`` then ``rejected``
        (deny) or ``queued`` (allow) transitions, and the outbox events
        ``received`` (and ``rejected`` with the reasons, for a deny).

        Returns:
            False, changing nothing, when *task_id* was already recorded
            (DESIGN "manifest": a replayed id never runs twice); else True.

        Raises:
            StateError: the database could not be written.
        """
        when = time_text(at)
        state = TaskState.REJECTED if decision == "deny" else TaskState.QUEUED
        with self._write("record") as db:
            cur = db.execute(
                f"INSERT INTO tasks ({COLUMNS}) VALUES "  # noqa: S608 - constant
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "NULL, NULL, NULL, NULL, NULL, NULL) "
                "ON CONFLICT (task_id) DO NOTHING",
                (
                    task_id,
                    project,
                    kind,
                    state,
                    decision,
                    _reasons_text(reasons),
                    manifest_sha256,
                    payload,
                    json.dumps(list(signer_keyids)),
                    launcher,
                    when,
                    when,
                ),
            )
            if cur.rowcount == 0:
                logger.info("state: task %s already recorded", task_id)
                return False
            detail = ",".join(rule for rule, _ in reasons)
            db.executemany(
                _INSERT_TRANSITION,
                [
                    (task_id, TaskState.RECEIVED, when, ""),
                    (task_id, state, when, detail),
                ],
            )
            received = _event(node, task_id, TaskState.RECEIVED, when)
            self._emit(db, received)
            if decision == "deny":
                rejected = _event(node, task_id, TaskState.REJECTED, when)
                self._emit(
                    db,
                    msgspec.structs.replace(rejected, reasons=_wire_reasons(reasons)),
                )
        return True

    def transition(
        self,
        task_id: str,
        state: str,
        *,
        node: str,
        at: datetime,
        exit_code: int | None = None,
        reasons: Sequence[tuple[str, str]] = (),
        outputs: tuple[str, int, int] | None = None,
        error: str | None = None,
        report: RunReport | None = None,
        usage: Mapping[str, float] | None = None,
        passing: Sequence[tuple[TaskState, datetime]] = (),
        results: Results | None = None,
    ) -> int:
        """Move a task to *state*, with its history row and status event.

        One transaction (one commit, one fsync) whatever the arguments: the
        states in *passing* and the result chunks are committed with it.

        Args:
            task_id: a recorded task that is not in a terminal state.
            state: one of ``STATES``.
            node: this node's id (routing key and event body).
            at: when it happened (aware).
            exit_code: the workload's exit code, stored and sent when given.
            reasons: stored and sent as ``reasons`` when given.
            outputs: ``(sha256, bytes, chunks)`` of the packed outputs.
            passing: ``(state, at)`` the task went through on its way to
                *state*, told by nobody yet (each gets its history row and
                its bare status event, before *state*'s).
            results: a packed archive whose chunks are queued in the same
                transaction, before the event, which then announces them as
                ``outputs`` (instead of *outputs*).
            error: our side's one-line failure text (stored, not sent).
            report: what the run left to tell (``log_tail``, ``started_at``,
                ``accounting``, ``network``), sent with the event.
            usage: what the task used (cpu_s, memory_peak_bytes, pids_peak,
                output_bytes, wall_s), stored and sent as ``usage``.

        Returns:
            The outbox ``seq`` of the status event.

        Raises:
            StateError: unknown task, a terminal task, or the write failed.
            StageOutError: the *results* archive cannot be read.
        """
        _check_state(state)
        when = time_text(at)
        rows: list[tuple[str, str, str, str]] = []
        if results is not None:
            size, rows = chunk_rows(task_id, node, results, when)
            outputs = (results.sha256, size, len(rows))
        event = _event(node, task_id, TaskState(state), when)
        if report is not None:
            event = msgspec.structs.replace(
                event,
                log_tail=report.log_tail,
                started_at=report.started_at,
                accounting=report.accounting,
                network=report.network,
            )
        sets = ["state = ?", "updated_at = ?"]
        args: list[object] = [state, when]
        detail: list[str] = []
        if exit_code is not None:
            event = msgspec.structs.replace(event, exit_code=exit_code)
            sets.append("exit_code = ?")
            args.append(exit_code)
            detail.append(f"exit_code={exit_code}")
        if reasons:
            event = msgspec.structs.replace(event, reasons=_wire_reasons(reasons))
            sets.append("reasons = ?")
            args.append(_reasons_text(reasons))
            detail.append("rules=" + ",".join(rule for rule, _ in reasons))
        if outputs is not None:
            sha256, size, chunks = outputs
            sent = Outputs(sha256=sha256, bytes=size, chunks=chunks)
            event = msgspec.structs.replace(event, outputs=sent)
            sets += ["output_sha256 = ?", "output_bytes = ?", "output_chunks = ?"]
            args += [sha256, size, chunks]
            detail.append(f"output_sha256={sha256}")
        if usage:
            used = msgspec.convert(dict(usage), Usage, strict=False)
            event = msgspec.structs.replace(event, usage=used)
            text = json.dumps(dict(usage), sort_keys=True)
            sets.append("usage = ?")
            args.append(text)
            detail.append("usage=" + text)
        if error is not None:
            error = printable(error)
            sets.append("error = ?")
            args.append(error)
            detail.append(f"error={error}")
        with self._write("transition") as db:
            row = db.execute(
                "SELECT state FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if row is None:
                raise StateError(f"state: unknown task {cut(task_id)}")
            if row[0] in TERMINAL_STATES:
                raise StateError(
                    f"state: task {cut(task_id)} is already {row[0]}"
                    f" (cannot become {state})"
                )
            db.execute(
                f"UPDATE tasks SET {', '.join(sets)} WHERE task_id = ?",  # noqa: S608
                (*args, task_id),
            )
            for step, step_at in passing:
                step_when = time_text(step_at)
                db.execute(_INSERT_TRANSITION, (task_id, step, step_when, ""))
                self._emit(db, _event(node, task_id, step, step_when))
            self._queue_chunks(db, rows)
            db.execute(
                _INSERT_TRANSITION,
                (task_id, state, when, "; ".join(detail)),
            )
            seq = self._emit(db, event)
        logger.info("state: task %s -> %s (seq %d)", task_id, state, seq)
        return seq

    def event_only(
        self,
        *,
        task_id: str,
        state: str,
        node: str,
        at: datetime,
        reasons: Sequence[tuple[str, str]] = (),
    ) -> int:
        """Queue a status event without touching any task row.

        Answers a replayed id (``rejected``) or an envelope whose id could not
        be read (*task_id* ``"unknown"``).

        Returns:
            The outbox ``seq`` of the event.

        Raises:
            StateError: the write failed.
        """
        _check_state(state)
        event = _event(node, task_id, TaskState(state), time_text(at))
        event = msgspec.structs.replace(event, reasons=_wire_reasons(reasons))
        with self._write("event") as db:
            return self._emit(db, event)

    def get(self, task_id: str) -> TaskRow | None:
        """Return the task recorded under *task_id*, or None.

        Raises:
            StateError: the read failed or a row is malformed.
        """
        with self._read("get") as db:
            row = db.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE task_id = ?",  # noqa: S608
                (task_id,),
            ).fetchone()
        return None if row is None else task_row(row)

    def unfinished(self) -> list[TaskRow]:
        """Return every task not in a terminal state, oldest first.

        Raises:
            StateError: the read failed or a row is malformed.
        """
        marks = ", ".join("?" for _ in TERMINAL_STATES)
        with self._read("unfinished") as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM tasks WHERE state NOT IN ({marks}) "  # noqa: S608
                "ORDER BY received_at, rowid",
                sorted(TERMINAL_STATES),
            ).fetchall()
        return [task_row(row) for row in rows]

    def history(self, limit: int | None = None) -> list[TaskRow]:
        """Return recorded tasks, newest first, at most *limit* of them.

        Raises:
            StateError: the read failed or a row is malformed.
        """
        with self._read("history") as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM tasks "  # noqa: S608
                "ORDER BY received_at DESC, rowid DESC LIMIT ?",
                (-1 if limit is None else max(limit, 0),),
            ).fetchall()
        return [task_row(row) for row in rows]

    def transitions(self, task_id: str) -> list[tuple[str, datetime, str]]:
        """Return ``(state, at, detail)`` for every transition of a task, in order.

        Raises:
            StateError: the read failed.
        """
        with self._read("transitions") as db:
            rows = db.execute(
                "SELECT state, at, detail FROM transitions "
                "WHERE task_id = ? ORDER BY id",
                (task_id,),
            ).fetchall()
        return [(state, parse_time(at), detail) for state, at, detail in rows]

    def prune(self, before: datetime) -> tuple[int, int]:
        """Forget what neither replay protection nor the audit needs any more.

        Deletes published outbox messages created before *before* and clears
        the payload of tasks that ended before it. Every task row stays, with
        its id, decision, reasons, signer keyids and hashes (a replayed id is
        refused forever), and so do the transitions. Then gives the freed
        pages back to the file system.

        Returns:
            (outbox messages deleted, task payloads cleared).

        Raises:
            StateError: the write failed.
        """
        when = time_text(before)
        marks = ", ".join("?" for _ in TERMINAL_STATES)
        with self._write("prune") as db:
            events = db.execute(
                "DELETE FROM outbox WHERE published = 1 AND created_at < ?", (when,)
            ).rowcount
            payloads = db.execute(
                "UPDATE tasks SET payload = NULL WHERE payload IS NOT NULL"  # noqa: S608
                f" AND updated_at < ? AND state IN ({marks})",
                (when, *sorted(TERMINAL_STATES)),
            ).rowcount
        if events or payloads:
            with self._lock, self._guard("prune"):
                # executescript() steps the pragma to its end (execute() frees
                # one page); no transaction is open here.
                self._db.executescript("PRAGMA incremental_vacuum;")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return events, payloads

    def counts(self) -> dict[str, int]:
        """Return the number of tasks in each state (for sd_notify ``STATUS=``).

        Raises:
            StateError: the read failed.
        """
        with self._read("counts") as db:
            rows = db.execute(
                "SELECT state, COUNT(*) FROM tasks GROUP BY state"
            ).fetchall()
        return {state: count for state, count in rows}
