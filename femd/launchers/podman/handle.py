"""A task's podman container once started: wait, timeout, cancel, logs, removal.

Owns ``PodmanHandle``. A ``wait()`` that returns an ``Outcome`` removes the
container (after copying up to ``log_max_bytes`` of its log, which ``logs()``
serves from then on). Timeouts are wall-clock, from the container's
``StartedAt``, and survive an agent restart; a cancel or a timeout leaves a
marker in the launcher's own state directory (``<state_dir>/launchers/podman/``)
so the terminal state survives one too.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import msgspec

from femd.errors import LaunchError
from femd.launchers import Outcome, Usage
from femd.launchers.ending import judge
from femd.launchers.network import TaskNetwork
from femd.launchers.podman.client import on_container, parse_time
from femd.launchers.podman.container import (
    CONMON_SLACK_S,
    STOP_GRACE_S,
    conmon_timeout_s,
)
from femd.launchers.podman.outputs import OutputStream, absent_capture
from femd.launchers.podman.record import LaunchRecord
from femd.model import TaskId

__all__ = ["PodmanHandle"]

logger = logging.getLogger(__name__)

_TAIL_BYTES: Final = 4096
_DONE: Final = frozenset({"exited", "stopped", "dead"})
_NEVER_STARTED: Final = frozenset({"created", "configured", "initialized"})
_STEP_PROCESSES: Final = 2  # podman's init and femd's output step
_COLLECT_S: Final = 300.0  # for a step that waited to stream, once read
_UNKNOWN_MAX: Final = 3  # process lists refused before the deadline holds
# Inspections that fail in a row before wait() gives up: podman answers 500
# ("read /proc/PID/cgroup: no such process") when asked while the container's
# process exits, and the next inspection sees it exited.
_INSPECT_TRIES: Final = 3


class PodmanHandle:
    """A task's container: wait for it, cancel it, read its logs, remove it."""

    def __init__(
        self,
        url: str,
        container_id: str,
        task_id: TaskId,
        *,
        timeout_s: float,
        log_max_bytes: int,
        markers: Path,
        stream: OutputStream | None,
        net: TaskNetwork | None = None,
    ) -> None:
        """Follow container *container_id* (use ``launch()``/``adopt()``)."""
        self.task_id = task_id
        self._net = net
        self._stream = stream
        self.container_id = container_id
        self._url = url
        self._timeout_s = timeout_s
        self._log_max = log_max_bytes
        self._markers = markers
        self._outcome: Outcome | None = None
        self._log: bytes | None = None
        self._expired = False
        self._collect_by: float | None = None
        self._unknown = 0

    def _marker(self, kind: str) -> Path:
        return self._markers / f"{self.task_id}.{kind}"

    def _mark(self, kind: str) -> None:
        self._markers.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._marker(kind).touch()

    def _attrs(self) -> dict[str, Any] | None:
        return on_container(
            self._url,
            self.container_id,
            f"inspect {self.task_id}",
            lambda c: dict(c.attrs),
            None,
        )

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        """Wait up to *timeout_s* (forever if None); None while still running.

        Enforces the task's timeout (stop, then kill after the grace period).
        The ``Outcome`` is collected once; the container is then removed.

        Raises:
            LaunchError: podman could not be asked.
        """
        if self._outcome is not None:
            return self._outcome
        end = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.02
        failed = 0
        while True:
            try:
                attrs = self._attrs()
            except LaunchError as e:
                failed += 1
                if failed >= _INSPECT_TRIES:
                    raise
                logger.info("task %s: %s; inspecting again", self.task_id, e)
                time.sleep(0.1 * failed)
                continue
            failed = 0
            if attrs is None:
                return self._finish(None)
            state = attrs.get("State") or {}
            status = str(state.get("Status", ""))
            if status in _DONE or status in _NEVER_STARTED:
                return self._finish(attrs)
            started = parse_time(state.get("StartedAt"))
            deadline = started + timedelta(seconds=self._timeout_s) if started else None
            if (
                deadline is not None
                and datetime.now(UTC) >= deadline
                and not self._expired
                and self._overdue()
            ):
                continue
            if end is not None and time.monotonic() >= end:
                return None
            left = math.inf if end is None else end - time.monotonic()
            time.sleep(max(0.0, min(pause, left)))
            pause = min(pause * 1.5, 0.25)

    def _overdue(self) -> bool:
        """Past the deadline: stop the container unless its command has ended.

        A command that ended while no agent read the stream left only podman's
        init and femd's step (blocked on the FIFO): that is not a timeout; the
        step gets ``_COLLECT_S`` to stream to the reader adopt() opened, then
        is stopped (its outputs not collected). True when the container must
        be inspected again (stopped, or podman's process list was refused).
        """
        if self._collect_by is None and self._stream is not None:
            ended = self._ended()
            if ended is None and self._unknown < _UNKNOWN_MAX:
                self._unknown += 1
                time.sleep(0.2)
                return True  # (gone meanwhile?) inspect it again
            if ended:
                logger.info("task %s: ended while no agent ran", self.task_id)
                self._collect_by = time.monotonic() + _COLLECT_S
        if self._collect_by is not None and time.monotonic() < self._collect_by:
            return False
        self._expired = True
        if self._collect_by is None:
            logger.info(
                "task %s: timeout of %gs reached, stopping",
                self.task_id,
                self._timeout_s,
            )
            self._mark("timed_out")
        self._stop(STOP_GRACE_S)
        return True

    def _ended(self) -> bool | None:
        """True when only podman's init and femd's step run in the container.

        The step kills every other process once the task's command ended, and
        the command's own init runs until then: podman's process list (as
        trusted as its inspect) tells the end without trusting the task.
        None when podman would not list them (the container ended meanwhile).
        """
        try:
            top = on_container(
                self._url,
                self.container_id,
                f"top {self.task_id}",
                lambda c: c.top(ps_args="pid"),
                None,
            )
        except LaunchError:
            return None
        procs = (top or {}).get("Processes") if isinstance(top, dict) else None
        return isinstance(procs, list) and 0 < len(procs) <= _STEP_PROCESSES

    def _stop(self, grace_s: float) -> None:
        on_container(
            self._url,
            self.container_id,
            f"stop {self.task_id}",
            lambda c: c.stop(timeout=max(1, math.ceil(grace_s)), ignore=True),
            None,
        )

    def cancel(self, grace_s: float = 10.0) -> None:
        """Stop the container: SIGTERM, SIGKILL after *grace_s*; it ends ``cancelled``.

        Raises:
            LaunchError: podman could not be asked.
        """
        if self._outcome is not None:
            return
        self._mark("cancelled")
        self._stop(grace_s)

    def _read_log(self) -> tuple[bytes, bytes]:
        """(head up to log_max_bytes, tail up to 4 KiB) of the container's log."""

        def read(container: Any) -> tuple[bytes, bytes]:  # noqa: ANN401 (untyped podman-py)
            head = bytearray()
            tail: collections.deque[bytes] = collections.deque()
            kept = 0
            for chunk in container.logs(stream=True, follow=False):
                if not isinstance(chunk, bytes):
                    continue
                if len(head) < self._log_max:
                    head += chunk[: self._log_max - len(head)]
                tail.append(chunk)
                kept += len(chunk)
                while kept - len(tail[0]) >= _TAIL_BYTES:
                    kept -= len(tail.popleft())
            return bytes(head), b"".join(tail)[-_TAIL_BYTES:]

        return on_container(
            self._url, self.container_id, f"logs of {self.task_id}", read, (b"", b"")
        )

    def logs(self) -> Iterator[bytes]:
        """stdout+stderr (interleaved), at most ``log_max_bytes``.

        Raises:
            LaunchError: podman could not be asked.
        """
        data = self._log if self._log is not None else self._read_log()[0]
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    def _finish(self, attrs: dict[str, Any] | None) -> Outcome:
        outcome = self._collect(attrs)
        if self._net is not None:
            # The task ended: its ports close now; the counts go in the outcome.
            traffic = self._net.close()
            self._net = None
            outcome = msgspec.structs.replace(outcome, traffic=traffic)
        self._outcome = outcome
        return outcome

    def _collect(self, attrs: dict[str, Any] | None) -> Outcome:
        now = datetime.now(UTC)
        if attrs is None:
            self._outcome = Outcome(
                state="failed",
                exit_code=None,
                started_at=now,
                finished_at=now,
                log_tail="",
                reason="the container disappeared",
            )
            if self._stream is not None:
                self._stream.close()
            self._log = b""
            self._drop_markers()
            return self._outcome
        state = attrs.get("State") or {}
        head, tail = self._read_log()
        started = parse_time(state.get("StartedAt"))
        finished = parse_time(state.get("FinishedAt")) or now
        code = state.get("ExitCode")
        exit_code = int(code) if isinstance(code, int) and started else None
        # The step has sent its stream (or never will): read it to its end.
        stream = self._stream
        capture = stream.finish() if stream is not None else absent_capture()
        # conmon's own kill (no agent waited): a command that ended and was
        # collected late is stopped before that.
        conmon_timeout = (
            started is not None
            and exit_code != 0
            and (finished - started).total_seconds()
            >= conmon_timeout_s(self._timeout_s) - CONMON_SLACK_S
        )
        ending = judge(
            capture,
            exit_code,
            max_bytes=stream.max_bytes if stream is not None else 0,
            timed_out=f"timed out after {self._timeout_s:g}s"
            if self._marker("timed_out").exists() or conmon_timeout
            else None,
            cancelled=self._marker("cancelled").exists(),
            out_of_memory="killed: out of memory" if state.get("OOMKilled") else None,
            never_ran="the container was created but never started",
        )
        wall_s = (finished - started).total_seconds() if started else None
        self._outcome = Outcome(
            state=ending.state,
            exit_code=exit_code,
            started_at=started or finished,
            # podman stamps start and finish from different clocks' readings;
            # a task shorter than their skew must not end before it began.
            finished_at=max(finished, started or finished),
            log_tail=tail.decode("utf-8", errors="replace"),
            reason=ending.reason,
            rule=ending.rule,
            usage=Usage(
                output_bytes=capture.bytes,
                wall_s=None if wall_s is None else round(max(wall_s, 0.0), 3),
            ),
        )
        self._log = head
        try:
            self.remove()
        except LaunchError as e:
            # The outcome stands; a leftover container is found again by adopt().
            logger.warning("task %s: container not removed: %s", self.task_id, e)
        return self._outcome

    def _drop_markers(self) -> None:
        for kind in ("cancelled", "timed_out"):
            self._marker(kind).unlink(missing_ok=True)
        LaunchRecord.drop(self._markers, self.task_id)

    def remove(self) -> None:
        """Remove the container (killing it if still running) and its markers.

        Raises:
            LaunchError: podman could not be asked.
        """
        on_container(
            self._url,
            self.container_id,
            f"remove {self.task_id}",
            lambda c: c.remove(force=True, v=True),
            None,
        )
        self._drop_markers()
