"""The doctor's findings: one ``Check`` each, and the report made of them.

Owns the ``Check`` shape, the human report, the JSON one (what ``femd check
--capabilities`` reads) and the exit code. Does not run any check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

import msgspec

from femd.admission import HostReport

__all__ = ["Check", "Status", "exit_code", "render", "to_json"]

Status = Literal["ok", "warn", "fail"]


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one check: a status, one line, how to fix it, details."""

    name: str
    status: Status
    summary: str
    fix: str | None = None
    details: tuple[str, ...] = ()


_MARK: Final = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def render(checks: Sequence[Check], usable: Sequence[str]) -> str:
    """The human report: one line per check, indented details, a verdict."""
    lines: list[str] = []
    for c in checks:
        lines.append(f"{_MARK[c.status]}  {c.name}: {c.summary}")
        lines += [f"        {d}" for d in c.details]
        if c.fix:
            lines.append(f"        fix: {c.fix}")
    if usable:
        lines.append("tasks can run with: " + ", ".join(usable))
    else:
        lines.append(
            "no launcher can enforce every limit here: every task would be refused"
        )
    return "\n".join(lines) + "\n"


def to_json(
    checks: Sequence[Check], usable: Sequence[str], host: HostReport | None = None
) -> bytes:
    """The same, for machines: ``{"checks": [...], "usable": [...], "ok": bool}``.

    With *host*, also its ``profiles`` and ``capabilities`` (what ``femd check
    --capabilities`` reads).
    """
    out: dict[str, object] = {
        "ok": exit_code(checks, usable) == 0,
        "usable": list(usable),
        "checks": [msgspec.to_builtins(c) for c in checks],
    }
    if host is not None:
        out |= msgspec.to_builtins(host)
    return msgspec.json.encode(out)


def exit_code(checks: Sequence[Check], usable: Sequence[str]) -> int:
    """0 when nothing failed and some launcher can run tasks, else 1."""
    return 0 if usable and all(c.status != "fail" for c in checks) else 1
