"""How a sandboxed task ended: one decision for every bubblewrap launcher.

Owns ``judge()``, the pure order in which what happened to a task becomes its
terminal state, reason and rule: the timeout, a cancel, the memory killer,
a full output directory, a sandbox that never ran the command, the output
step's own failure, the command's exit code, the batch system's word, and
outputs that did not arrive. The ``process`` launcher (its cgroup, bwrap's
status) and ``slurm`` (the job's accounting) each say what happened; neither
repeats the order. The output capture's own reasons come from ``capture``.
"""

from __future__ import annotations

import signal
from typing import Literal

import msgspec

from femd.launchers.capture import OutputCapture
from femd.rules import Rule

__all__ = ["Ending", "judge"]

State = Literal["succeeded", "failed", "timed_out", "cancelled"]


class Ending(msgspec.Struct, frozen=True):
    """A task's terminal state, why (one line; "" on success) and the rule."""

    state: State
    reason: str = ""
    rule: str = ""


def _exit_reason(code: int) -> str:
    reason = f"exit code {code}"
    if 128 < code < 128 + signal.NSIG:
        reason += f" (killed by {signal.Signals(code - 128).name})"
    return reason


def judge(
    capture: OutputCapture,
    code: int | None,
    *,
    max_bytes: int,
    timed_out: str | None,
    cancelled: bool,
    out_of_memory: str | None,
    never_ran: str,
    unclean: str | None = None,
) -> Ending:
    """The ending of a task, first cause first.

    *code*: the command's exit code, None when it never ran (*never_ran*
    says why). *timed_out*, *out_of_memory*: the reason, when that happened.
    *unclean*: the batch system says the job did not complete although the
    command exited 0.
    """
    if timed_out:
        return Ending("timed_out", timed_out)
    if cancelled:
        return Ending("cancelled", "cancelled")
    if out_of_memory:
        return Ending("failed", out_of_memory)
    if capture.full:
        reason = capture.full_reason(max_bytes)
        return Ending("failed", reason, Rule.OUTPUTS_EXCEEDED.value)
    if code is None:
        return Ending("failed", never_ran)
    if step := capture.step_failure(code):
        return Ending("failed", step)
    if code != 0:
        return Ending("failed", _exit_reason(code))
    if unclean:
        return Ending("failed", unclean)
    if incomplete := capture.incomplete_reason():
        return Ending("failed", incomplete)
    return Ending("succeeded")
