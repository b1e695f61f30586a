"""The doctor's checks of this host: the policy, the state directory, the clock.

Owns when each is ok, a warning or a failure, and the fix it names. Does not
load the agent's configuration (the command does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from femd.doctor.report import Check, Status

__all__ = ["check_clock", "check_policy", "check_state_dir"]

FREE_WARN_BYTES: Final = 1 << 30
FREE_FAIL_BYTES: Final = 100 << 20


def check_policy(path: Path, node: str) -> Check:
    """Lint the policy; its ``node`` must be this node."""
    from femd.policy import lint_file, lint_warnings, load_policy

    problems = lint_file(path)
    if problems:
        return Check(
            name="policy",
            status="fail",
            summary=f"{len(problems)} problem(s) in {path}",
            fix=f"femd policy lint {path}",
            details=tuple(problems),
        )
    policy = load_policy(path).policy
    warnings = tuple(lint_warnings(path))
    if policy.node != node:
        return Check(
            name="policy",
            status="fail",
            summary=f"{path}: written for node {policy.node!r}, this is {node!r}",
            fix="the steward's policy must name this node (`node:`)",
        )
    return Check(
        name="policy",
        status="warn" if warnings else "ok",
        summary=f"{path}: node {policy.node}, {len(policy.signers)} signer(s), "
        f"{len(policy.projects)} project(s)",
        details=warnings,
    )


def check_state_dir(path: Path) -> Check:
    """The state directory exists, is writable, and has room."""
    probe = path / f".doctor-{secrets.token_hex(4)}"
    try:
        probe.write_bytes(b"femd doctor\n")
        probe.unlink()
        usage = shutil.disk_usage(path)
    except OSError as e:
        return Check(
            name="state dir",
            status="fail",
            summary=f"{path}: not writable ({e.strerror})",
            fix="it must exist and belong to the user femd runs as "
            "(the package's tmpfiles.d makes /var/lib/femd femd:femd 0750)",
        )
    free = usage.free
    status: Status = (
        "fail" if free < FREE_FAIL_BYTES else "warn" if free < FREE_WARN_BYTES else "ok"
    )
    return Check(
        name="state dir",
        status=status,
        summary=f"{path}: writable, {free / (1 << 30):.1f} GiB free",
        fix=None
        if status == "ok"
        else "free some space: work dirs and outputs of tasks are written here",
    )


_TIME_ERROR: Final = 5  # adjtimex(2): the clock is not synchronised


def _clock_state() -> int | None:
    """adjtimex(2) read-only; its return value, or None where it cannot be had."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0 (read)
    state = int(libc.adjtimex(buf))
    return None if state < 0 else state


def check_clock(skew_s: int) -> Check:
    """Is the system clock synchronised (NTP)? Task windows are judged by it."""
    state = _clock_state()
    now = datetime.now(UTC)
    when = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if state is None:
        return Check(
            name="clock", status="warn", summary=f"{when}; synchronisation unknown"
        )
    if state == _TIME_ERROR:
        return Check(
            name="clock",
            status="warn",
            summary=f"{when}; the kernel says the clock is not synchronised",
            fix=f"run an NTP client (systemd-timesyncd, chrony): task validity "
            f"windows are checked against this clock (clock_skew_s {skew_s})",
        )
    return Check(name="clock", status="ok", summary=f"{when}; synchronised")
