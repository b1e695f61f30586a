"""The Runner's backstop: a wedged launcher is cancelled, a queued batch job is not.

The backstop (timeout + margins) keeps a launcher that never reports an end from
holding a slot forever. A batch system's queue (the slurm launcher) is not the
task's time: while its handle says ``queued`` the backstop waits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from femd import execution
from femd.launchers import Outcome


class Clock:
    """time.monotonic for femd.execution; each of the handle's waits takes 50 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = Clock()


class BatchHandle:
    """A Handle whose job waits in a queue for *queued_polls* polls, then ends."""

    task_id = "t-1"

    def __init__(self, queued_polls: int, *, has_queue: bool = True) -> None:
        self.polls = 0
        self.queued_polls = queued_polls
        self.has_queue = has_queue
        self.cancels: list[float] = []

    @property
    def queued(self) -> bool:
        return self.has_queue and self.polls < self.queued_polls

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        self.polls += 1
        CLOCK.now += 50.0
        if self.cancels or self.polls > self.queued_polls:
            now = datetime.now(UTC)
            state = "cancelled" if self.cancels else "succeeded"
            return Outcome(
                state=state,
                exit_code=None if self.cancels else 0,
                started_at=now,
                finished_at=now,
                log_tail="",
            )
        return None

    def cancel(self, grace_s: float = 10.0) -> None:
        self.cancels.append(grace_s)

    def logs(self) -> Iterator[bytes]:
        return iter(())


def runner() -> execution.Runner:
    r = execution.Runner.__new__(execution.Runner)
    r.cancelled = threading.Event()
    r.grace_s = 1.0
    r.live_log = None
    r.running_at = None  # its running state already told
    return r


@pytest.fixture(autouse=True)
def fast_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execution.time, "monotonic", CLOCK)


def test_a_queued_job_is_not_cancelled_by_the_backstop():
    handle = BatchHandle(queued_polls=20)
    outcome = runner()._wait(handle, timeout_s=10)
    assert outcome.state == "succeeded"
    assert handle.cancels == []


def test_a_launcher_that_never_ends_is_cancelled():
    handle = BatchHandle(queued_polls=20, has_queue=False)
    outcome = runner()._wait(handle, timeout_s=10)
    assert outcome.state == "cancelled"
    assert handle.cancels == [1.0]
