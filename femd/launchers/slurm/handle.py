"""One Slurm job of one task: its state, timeout, cancellation and outcome.

Owns ``SlurmHandle``: it asks the controller (``scontrol show job``) at most
every ``poll_s``, cancels the job with ``scancel`` at the task's timeout
(counted from Slurm's own start time, so queueing does not count) or when
asked, and when the job ends it reads Slurm's accounting (``sacct``: elapsed,
CPU time, MaxRSS, exit code, node), copies the outputs and the log back and
removes the stage. Does not submit (``launcher``) nor pack outputs.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from femd.errors import LaunchError
from femd.launchers import Accounting, Outcome, Usage
from femd.launchers.ending import judge
from femd.launchers.slurm.client import SlurmClient
from femd.launchers.slurm.stage import JobFile, Stage
from femd.model import TaskId
from femd.model import utc_now as _now

__all__ = ["TERMINAL", "SlurmHandle", "to_accounting"]

logger = logging.getLogger(__name__)

# Job states after which nothing of the job runs any more (squeue(1)).
TERMINAL: Final = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
     "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED"}
)  # fmt: skip
_TAIL_BYTES: Final = 8192
_ACCOUNTING_WAIT_S: Final = 15.0


def _slurm_time(text: str | None) -> datetime | None:
    """Slurm's local ``YYYY-MM-DDTHH:MM:SS`` (or Unknown/None) as aware UTC."""
    try:
        return datetime.fromisoformat(text or "").astimezone(UTC)
    except ValueError:
        return None


def _seconds(text: str) -> float | None:
    """``[DD-][HH:]MM:SS[.mmm]`` (sacct's TotalCPU) in seconds."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    try:
        total = sum(float(p) * 60.0**i for i, p in enumerate(reversed(parts)))
        return total + (int(days) * 86400 if days else 0)
    except ValueError:
        return None


def _kilobytes(text: str) -> int | None:
    """The MaxRSS of sacct (``1234K``, ``12M``, ``0``) in KiB."""
    if not text:
        return None
    scale = {"K": 1, "M": 1024, "G": 1 << 20, "T": 1 << 30}.get(text[-1].upper())
    try:
        return int(float(text[:-1]) * scale) if scale else int(text) // 1024
    except ValueError:
        return None


def _exit(text: str) -> tuple[int | None, int | None]:
    code, _, sig = text.partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return None, None


def to_accounting(job_id: str, rows: list[dict[str, str]]) -> Accounting | None:
    """The job's ``Accounting`` from ``sacct`` rows; None while not terminal there.

    Elapsed, state, exit code and node come from the job's row; MaxRSS is the
    largest of its steps'; CPU time is the job's total.
    """
    job = next((r for r in rows if r.get("JobID") == job_id), None)
    if job is None:
        return None
    state = job.get("State", "").split()[0] if job.get("State") else ""
    if state not in TERMINAL:
        return None
    rss = [k for r in rows if (k := _kilobytes(r.get("MaxRSS", ""))) is not None]
    code, sig = _exit(job.get("ExitCode", ""))
    elapsed = job.get("ElapsedRaw", "")
    node = job.get("NodeList") or None
    return Accounting(
        job_id=job_id,
        state=state,
        node=None if node in (None, "None assigned") else node,
        elapsed_s=int(elapsed) if elapsed.isdigit() else None,
        cpu_s=_seconds(job.get("TotalCPU", "")),
        max_rss_kb=max(rss) if rss else None,
        exit_code=code,
        signal=sig,
    )


class SlurmHandle:
    """A task's batch job, from submission (or adoption) to its outcome."""

    def __init__(
        self,
        *,
        client: SlurmClient,
        stage: Stage,
        record: JobFile,
        log_path: Path,
        poll_s: float,
        accounting: bool,
    ) -> None:
        """Follow job ``record.job_id``; nothing is asked of Slurm yet."""
        self.task_id: TaskId = record.task_id
        self.job_id = record.job_id
        self._client = client
        self._stage = stage
        self._record = record
        self._log_path = log_path
        self._poll_s = poll_s
        self._accounting = accounting
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._started_at: datetime | None = None
        self._cancel_at: float | None = None
        self._killed = False
        self._timed_out = False
        self._last: dict[str, str] = {}
        self._tail = ""

    @property
    def queued(self) -> bool:
        """True while the job waits in Slurm's queue (the agent's backstop waits)."""
        return self._started_at is None and self._outcome is None

    # -- Handle --------------------------------------------------------------------

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        """The outcome, or None if the job still runs after *timeout_s*."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._outcome is None:
                    self._step()
                if self._outcome is not None:
                    return self._outcome
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            time.sleep(self._poll_s if left is None else min(self._poll_s, left))

    def cancel(self, grace_s: float = 10.0) -> None:
        """``scancel`` now (Slurm sends TERM), SIGKILL the job after *grace_s*."""
        with self._lock:
            if self._outcome is not None or self._cancel_at is not None:
                return
            self._cancel_at = time.monotonic() + max(0.0, grace_s)
            self._scancel()

    def logs(self) -> Iterator[bytes]:
        """The job's stdout+stderr (at most ``log_max_bytes``).

        While the job runs: as far as the shared filesystem shows it; after:
        the copy brought back.
        """
        running = self._outcome is None
        path = self._stage.log if running else self._log_path
        left = self._record.log_max_bytes if running else -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        except OSError as e:
            raise LaunchError(f"slurm: cannot read log of {self.task_id}: {e}") from e
        with os.fdopen(fd, "rb") as f:
            while left and (chunk := f.read(65536 if left < 0 else min(left, 65536))):
                left -= len(chunk) if left > 0 else 0
                yield chunk

    # -- polling -----------------------------------------------------------------------

    def _scancel(self, signal: str | None = None) -> None:
        try:
            self._client.cancel(self.job_id, signal)
        except LaunchError as e:
            logger.warning("slurm: task %s: %s", self.task_id, e)

    def _step(self) -> None:
        try:
            job = self._client.job(self.job_id)
        except LaunchError as e:
            # A controller that does not answer is no reason to give up a job.
            logger.warning("slurm: task %s: job %s: %s", self.task_id, self.job_id, e)
            return
        if job is not None:
            self._last = job
        state = (job or {}).get("JobState", "")
        if self._started_at is None and state not in ("", "PENDING"):
            self._started_at = _slurm_time((job or {}).get("StartTime")) or _now()
        if job is not None and state not in TERMINAL:
            self._enforce(state)
            return
        self._outcome = self._finish(state or None)

    def _enforce(self, state: str) -> None:
        now = time.monotonic()
        if self._cancel_at is not None:
            if now >= self._cancel_at and not self._killed:
                self._killed = True
                self._scancel("KILL")
            return
        if state != "RUNNING" or self._started_at is None:
            return
        ran_s = (_now() - self._started_at).total_seconds()
        if ran_s >= self._record.timeout_s:
            # Slurm's --time is whole minutes; the task's timeout is exact.
            self._timed_out = True
            self._cancel_at = now
            self._scancel("KILL")
            self._killed = True

    # -- the end ---------------------------------------------------------------------

    def _read_accounting(self) -> Accounting | None:
        if not self._accounting:
            return None
        deadline = time.monotonic() + _ACCOUNTING_WAIT_S
        while True:
            try:
                found = to_accounting(self.job_id, self._client.accounting(self.job_id))
            except LaunchError as e:
                logger.warning("slurm: task %s: no accounting: %s", self.task_id, e)
                return None
            # The controller hands the record to slurmdbd asynchronously.
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def _from_controller(self, state: str | None) -> Accounting:
        code, sig = _exit(self._last.get("ExitCode", ""))
        node = self._last.get("NodeList") or None
        return Accounting(
            job_id=self.job_id,
            state=state or "UNKNOWN",
            node=None if node in (None, "(null)") else node,
            exit_code=code,
            signal=sig,
        )

    def _copy_log(self) -> None:
        limit = self._record.log_max_bytes
        try:
            self._log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._stage.log, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = f.read(limit + 1)
                f.seek(max(0, os.fstat(f.fileno()).st_size - _TAIL_BYTES))
                self._tail = f.read(_TAIL_BYTES).decode(errors="replace")
            if len(data) > limit:
                data = data[:limit] + f"\n[femd: log cut at {limit} bytes]\n".encode()
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
            with os.fdopen(os.open(self._log_path, flags, 0o600), "wb") as out:
                out.write(data)
        except OSError as e:
            logger.warning("slurm: task %s: log not copied: %s", self.task_id, e)

    def _finish(self, state: str | None) -> Outcome:
        acct = self._read_accounting() or self._from_controller(state)
        self._copy_log()
        # As the process launcher: the output step's stream, hostile, capped.
        capture = self._stage.collect(
            Path(self._record.output_dir), self._record.output_max_bytes
        )
        code = acct.exit_code if self._stage.ran() else None
        timed_out = None
        if self._timed_out or acct.state == "TIMEOUT":
            timed_out = f"timeout of {self._record.timeout_s} s reached"
            if not self._timed_out:
                minutes = math.ceil(self._record.timeout_s / 60)
                timed_out += f" (Slurm's time limit of {minutes} min)"
        oom = "out of memory: killed in the job's cgroup (Slurm's --mem)"
        ended = f"job {self.job_id} ended {acct.state}"
        end = judge(
            capture,
            code,
            max_bytes=self._record.output_max_bytes,
            timed_out=timed_out,
            cancelled=self._cancel_at is not None,
            out_of_memory=oom if acct.state == "OUT_OF_MEMORY" else None,
            never_ran=f"{ended} before the task ran",
            unclean=ended if acct.state != "COMPLETED" else None,
        )
        self._stage.remove()
        logger.info(
            "slurm: task %s (job %s on %s) %s %s",
            self.task_id, self.job_id, acct.node, end.state, end.reason,
        )  # fmt: skip
        rss = acct.max_rss_kb
        return Outcome(
            state=end.state,
            exit_code=code,
            started_at=self._started_at or _now(),
            finished_at=_now(),
            log_tail=self._tail,
            reason=end.reason,
            rule=end.rule,
            usage=Usage(
                cpu_s=acct.cpu_s,
                memory_peak_bytes=None if rss is None else rss * 1024,
                output_bytes=capture.bytes,
                wall_s=None if acct.elapsed_s is None else float(acct.elapsed_s),
            ),
            accounting=acct,
        )
