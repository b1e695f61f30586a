"""The orchestrator's commands: ``submit``, ``watch``, ``cancel``, ``nodes``.

Owns how they are spelled and what they print, FEM's per-node result lines
(``watch --format fem``) included; the broker side is ``femd.client``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from femd.cli.console import Subcommands, read_input
from femd.events import TERMINAL_STATES

if TYPE_CHECKING:
    from femd.client import Client
    from femd.config import OrchestratorConfig

__all__ = ["add_commands", "add_orchestrator_args", "open_client"]


def add_commands(sub: Subcommands) -> None:
    """Add ``submit``, ``watch``, ``cancel`` and ``nodes`` to the ``femd`` parser."""
    s = sub.add_parser("submit", help="orchestrator: publish an envelope to nodes")
    s.add_argument("envelope", help="envelope file (- for stdin)")
    s.add_argument("--node", action="append", required=True, help="node id (repeat)")
    add_orchestrator_args(s)
    s.set_defaults(func=_cmd_submit)

    s = sub.add_parser(
        "watch", help="orchestrator: follow status events, collect outputs"
    )
    s.add_argument("--task", help="stop when this task is done on every --node")
    s.add_argument("--node", action="append", help="node expected to report (repeat)")
    add_orchestrator_args(s)
    s.add_argument("--timeout", type=float, help="give up after this many seconds")
    s.add_argument("--format", choices=["json", "fem"], default="json")
    s.add_argument("--logs", action="store_true", help="also print live task output")
    s.set_defaults(func=_cmd_watch)

    s = sub.add_parser("cancel", help="orchestrator: sign and submit a Cancel")
    s.add_argument("task", help="the task id to cancel")
    s.add_argument("--node", action="append", required=True, help="node id (repeat)")
    s.add_argument("--key", action="append", required=True, help="private key (repeat)")
    s.add_argument("--project", help="the task's project (default: as submitted)")
    s.add_argument("--issuer", help="the manifest's issuer")
    add_orchestrator_args(s)
    s.set_defaults(func=_cmd_cancel)

    s = sub.add_parser("nodes", help="orchestrator: every node, last seen, up/down")
    add_orchestrator_args(s)
    s.add_argument("--receive", type=float, default=2.0, help="listen first, s")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_nodes)


def add_orchestrator_args(s: argparse.ArgumentParser) -> None:
    """Add the options every orchestrator command takes (config, inbox)."""
    s.add_argument("--config", help="orchestrator config (default $FEMD_CONFIG)")
    s.add_argument(
        "--inbox",
        "--results",
        dest="inbox",
        help="the orchestrator inbox directory (default: results_dir)",
    )


def _orchestrator_config(args: argparse.Namespace) -> OrchestratorConfig:
    from femd.config import load_orchestrator_config

    return load_orchestrator_config(
        Path(args.config) if args.config else None, os.environ
    )


def open_client(args: argparse.Namespace) -> Client:
    """The orchestrator client the command line's options describe."""
    from femd.client import Client

    cfg = _orchestrator_config(args)
    inbox = getattr(args, "inbox", None)
    return Client(cfg, inbox=Path(inbox) if inbox else None)


def _cmd_submit(args: argparse.Namespace) -> int:
    data = read_input(args.envelope, "envelope")
    with open_client(args) as client:
        task_id = client.submit(data, args.node)
    print(f"submitted task {task_id} to {', '.join(args.node)}")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from femd.keys import load_private_key

    keys = [load_private_key(Path(k)) for k in args.key]
    with open_client(args) as client:
        cancel_id = client.cancel(
            args.task, args.node, keys, project=args.project, issuer=args.issuer
        )
    print(f"submitted cancel {cancel_id} of task {args.task} to {', '.join(args.node)}")
    return 0


def _fem_line(event: dict[str, object]) -> dict[str, object]:
    """FEM dashboards' per-node result shape (issue: FEM interoperability)."""
    started = event.get("started_at")
    stopped = event.get("at")
    elapsed = None
    if isinstance(started, str) and isinstance(stopped, str):
        try:
            elapsed = (
                datetime.fromisoformat(stopped) - datetime.fromisoformat(started)
            ).total_seconds()
        except (ValueError, TypeError):  # a node's malformed time must not stop watch
            elapsed = None
    error = None
    if event.get("state") != "succeeded":
        reasons = event.get("reasons")
        reasons = reasons if isinstance(reasons, list) else []
        code = event.get("exit_code")
        error = "; ".join(
            f"{r.get('rule')}: {r.get('message')}"
            for r in reasons
            if isinstance(r, dict)
        ) or str(event.get("error") or event.get("state")) + (
            f" (exit code {code})" if code is not None else ""
        )
    state = event.get("state")
    return {
        "node": event.get("node"),
        "task_id": event.get("task_id"),
        "exit_code": event.get("exit_code"),
        "start_time": started,
        "stop_time": stopped,
        "elapsed_time_sec": elapsed,
        "error": error,
        # FEM's per-node execution report, as its dashboard reads it.
        "process_info": {
            "status": _FEM_STATUS.get(str(state), str(state)),
            "return_code": event.get("exit_code"),
            "start_time": started,
            "finish_time": stopped,
        },
    }


# femd's terminal states as FEM's process_info.status words.
_FEM_STATUS: dict[str, str] = {
    "succeeded": "finished",
    "failed": "failed",
    "timed_out": "timeout",
    "cancelled": "cancelled",
    "rejected": "rejected",
}


def _cmd_watch(args: argparse.Namespace) -> int:
    from femd.inbox import EventGap, LogBatch, OutputStatus

    with open_client(args) as client:
        watch = client.watch(args.task, nodes=args.node or (), logs=args.logs)
        for item in watch.follow(timeout_s=args.timeout):
            if isinstance(item, LogBatch):
                # Task output, never a femd record: marked as such, per node.
                for line in item.text.splitlines():
                    out = {"node": item.node, "task_id": item.task_id, "log": line}
                    print(json.dumps(out), flush=True)
                if item.dropped:
                    note = {"node": item.node, "task_id": item.task_id}
                    print(
                        json.dumps({**note, "log_dropped_bytes": item.dropped}),
                        flush=True,
                    )
            elif isinstance(item, EventGap):
                print(
                    f"femd: warning: {item} (lost between the node and this inbox)",
                    file=sys.stderr,
                )
            elif isinstance(item, OutputStatus):
                if item.status == "complete":
                    print(
                        f"femd: outputs of {item.task_id} from {item.node}"
                        f" verified in {item.path}",
                        file=sys.stderr,
                    )
            elif args.format == "fem":
                if item.state in TERMINAL_STATES:
                    print(json.dumps(_fem_line(item.body)), flush=True)
            else:
                print(json.dumps(item.body, sort_keys=True), flush=True)
    for e in watch.errors:
        print(f"femd: error: {e}", file=sys.stderr)
    if args.task and not watch.done:
        print(
            f"femd: error: watch: timed out waiting for task {args.task}",
            file=sys.stderr,
        )
        return 2
    return 2 if watch.errors else 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.receive > 0:
            client.receive(args.receive)
        views = client.nodes()
    if args.json:
        out = [
            {"node": v.node, "age_s": round(v.age_s, 1), "down": v.down, **v.status}
            for v in views
        ]
        print(json.dumps(out, indent=1, sort_keys=True))
        return 0
    for v in views:
        st = v.status
        print(
            f"{v.node:<24} {'DOWN' if v.down else 'up':<5} seen {v.age_s:7.1f} s ago"
            f"  femd {st.get('version', '?')}  running {st.get('running', '?')}"
            f"  queued {st.get('queued', '?')}"
            f"  disk free {_gib(st.get('disk_free_bytes'))}"
            f"  cert until {st.get('cert_not_after', '?')}"
        )
    return 0


def _gib(value: object) -> str:
    if not isinstance(value, int):
        return "?"
    return f"{value / 2**30:.1f} GiB"
