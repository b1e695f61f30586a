"""``femd tasks``: task history, the node's own or the orchestrator inbox's.

Owns the history's table and JSON; the rows are ``femd.state``'s (node) and
``femd.client``'s (orchestrator).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

from femd.cli.console import Subcommands
from femd.cli.orchestrator import open_client
from femd.errors import InputError

__all__ = ["add_commands"]


def add_commands(sub: Subcommands) -> None:
    """Add ``tasks`` to the ``femd`` parser."""
    s = sub.add_parser("tasks", help="the node's local task history")
    s.add_argument("--config", help="femd.yaml, or with --orchestrator its config")
    s.add_argument("--state-dir", help="read this state directory instead")
    s.add_argument(
        "--orchestrator", action="store_true", help="the orchestrator inbox's tasks"
    )
    s.add_argument("--inbox", "--results", dest="inbox", help="with --orchestrator")
    s.add_argument("--receive", type=float, default=0.0, help="listen first, s")
    s.add_argument("--limit", type=int, help="at most this many, newest first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_tasks)


def _cmd_orchestrator_tasks(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.receive > 0:
            client.receive(args.receive)
        rows = client.tasks()
        outputs = {(r.node, r.task_id): client.outputs(r.node, r.task_id) for r in rows}
    if args.limit is not None:
        rows = rows[: max(args.limit, 0)]
    if args.json:
        out = []
        for r in rows:
            o = outputs[(r.node, r.task_id)]
            out.append(
                {
                    "node": r.node,
                    "task_id": r.task_id,
                    "state": r.state,
                    "at": r.at,
                    "outputs": None
                    if o is None
                    else {"status": o.status, "path": o.path, "error": o.error},
                }
            )
        print(json.dumps(out, indent=1))
        return 0
    for r in rows:
        o = outputs[(r.node, r.task_id)]
        where = "" if o is None else f"outputs {o.status} {o.path or o.error or ''}"
        print(f"{r.at:<28} {r.node:<16} {r.task_id:<38} {r.state:<10} {where}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from femd.config import load_config
    from femd.state import State
    from femd.statedir import StateDir

    if args.orchestrator:
        return _cmd_orchestrator_tasks(args)

    if args.state_dir:
        state_dir = Path(args.state_dir)
    else:
        state_dir = load_config(
            Path(args.config) if args.config else None, os.environ
        ).state_path
    db = StateDir(state_dir).db
    if not db.exists():
        raise InputError(f"tasks: no state at {db}")
    state = State(db)
    try:
        rows = state.history(args.limit)
    finally:
        state.close()
    if args.json:
        out = [
            {
                "task_id": r.task_id,
                "project": r.project,
                "kind": r.kind,
                "state": r.state,
                "decision": r.decision,
                "reasons": [{"rule": a, "message": b} for a, b in r.reasons],
                "received_at": r.received_at.isoformat().replace("+00:00", "Z"),
                "updated_at": r.updated_at.isoformat().replace("+00:00", "Z"),
                "exit_code": r.exit_code,
                "output_sha256": r.output_sha256,
                "manifest_sha256": r.manifest_sha256,
                "signer_keyids": list(r.signer_keyids),
                "usage": r.usage,
            }
            for r in rows
        ]
        print(json.dumps(out, indent=1))
        return 0
    for r in rows:
        when = r.updated_at.strftime("%Y-%m-%d %H:%M:%S")
        rules = ",".join(a for a, _ in r.reasons)
        line = f"{when}  {r.task_id:<38} {r.project:<24} {r.state:<10} {rules}"
        print(f"{line}  {_usage_text(r.usage)}".rstrip())
    return 0


def _usage_text(usage: Mapping[str, float] | None) -> str:
    """``cpu 1.2s mem 30.1MiB pids 4 out 0.0MiB wall 3.0s`` (what is known)."""
    if not usage:
        return ""
    mib = 1 << 20
    shown = [
        ("cpu", "cpu_s", 1, "s"),
        ("mem", "memory_peak_bytes", mib, "MiB"),
        ("pids", "pids_peak", 1, ""),
        ("out", "output_bytes", mib, "MiB"),
        ("wall", "wall_s", 1, "s"),
    ]
    return " ".join(
        f"{name} {usage[key] / div:.{0 if name == 'pids' else 1}f}{unit}"
        for name, key, div, unit in shown
        if key in usage
    )
