"""``femd check``: the dry run, verify and decide with nothing run.

Owns the command's arguments (``--at``, ``--skew``, ``--config``,
``--capabilities``) and its verdict text and JSON; the verdict itself is
``femd.admission``'s, the same one the agent reaches.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from femd.cli.console import Subcommands, read_input
from femd.errors import InputError, cut

if TYPE_CHECKING:
    from femd.admission import Host

__all__ = ["add_commands"]


def add_commands(sub: Subcommands) -> None:
    """Add ``check`` to the ``femd`` parser."""
    s = sub.add_parser("check", help="dry run: verify and decide, nothing runs")
    s.add_argument("envelope", help="envelope file (- for stdin)")
    s.add_argument("--policy", required=True, help="policy file or directory")
    s.add_argument("--node", help="decide as this node (default: the policy's node)")
    s.add_argument("--at", help="decide at this RFC 3339 time (default: now)")
    s.add_argument("--skew", type=_skew, default=300, help="clock skew allowed, s")
    s.add_argument("--json", action="store_true", help="one JSON object")
    how = s.add_mutually_exclusive_group()
    how.add_argument(
        "--config", help="femd.yaml: also check against this host's probed launchers"
    )
    how.add_argument(
        "--capabilities",
        metavar="FILE",
        help="also check against these launchers (`femd doctor --json` output)",
    )
    s.set_defaults(func=_cmd_check)


def _parse_time(text: str) -> datetime:
    try:
        t = datetime.fromisoformat(text)
    except ValueError as e:
        raise InputError(f"--at: not an RFC 3339 time (got {cut(text)!r})") from e
    if t.tzinfo is None:
        raise InputError(f"--at: the time needs a zone, e.g. Z (got {cut(text)!r})")
    try:
        return t.astimezone(UTC)
    except OverflowError as e:
        raise InputError(f"--at: out of range (got {cut(text)!r})") from e


def _skew(text: str) -> float:
    """Argparse type: a clock skew in seconds, 0 to 86400 (as `clock_skew_s`)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected 0 to 86400 seconds, got {text!r}")
    return value


def _check_host(args: argparse.Namespace) -> tuple[Host | None, str | None]:
    """The launchers ``femd check`` admits against, and the node they are on.

    From ``--capabilities`` (a ``femd doctor --json`` output), or probed on
    this host from ``--config``'s launcher profiles (as ``femd doctor``
    does), or none: then only the trust kernel runs.
    """
    import shutil
    import tempfile

    from femd.admission import Host, decode_host
    from femd.config import load_config
    from femd.launchers import build_all, load_profiles
    from femd.statedir import StateDir

    if args.capabilities:
        return decode_host(read_input(args.capabilities, "capabilities")), None
    if not args.config:
        return None, None
    config = load_config(Path(args.config), os.environ)
    profiles = load_profiles(Path(config.launchers))
    logging.getLogger("femd.launchers.podman").setLevel(logging.ERROR)
    scratch = Path(tempfile.mkdtemp(prefix="femd-check-"))
    try:
        _, caps = build_all(
            profiles, state_dir=scratch, configs=config.launcher_configs()
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Host(profiles, caps, StateDir(config.state_path).work), config.node


def _cmd_check(args: argparse.Namespace) -> int:
    from femd.admission import admit_here
    from femd.policy import load_policy

    policy = load_policy(Path(args.policy))
    data = read_input(args.envelope, "envelope")
    now = _parse_time(args.at) if args.at else datetime.now(UTC)
    host, host_node = _check_host(args)
    node = args.node or host_node or policy.policy.node
    verdict = admit_here(data, policy, node=node, now=now, skew_s=args.skew, host=host)
    m = verdict.manifest
    allowed = verdict.decision.allowed
    if args.json:
        out = {
            "decision": "allow" if allowed else "deny",
            "task_id": m.id if m else None,
            "project": m.project if m else None,
            "signers": list(verdict.signers),
            "reasons": [
                {"rule": r.rule.value, "message": r.message}
                for r in verdict.decision.reasons
            ],
            "launch_checked": host is not None,
        }
        print(json.dumps(out))
        return 0 if allowed else 1
    what = f"task {m.id} (project {m.project}, {type(m).__name__})" if m else "envelope"
    print(f"{'ALLOW' if allowed else 'DENY'}: {what} on node {node}")
    for r in verdict.decision.reasons:
        print(f"  - {r.rule.value}: {r.message}")
    if verdict.signers:
        print(f"  signed by: {', '.join(verdict.signers)}")
    if host is None:
        print(
            "  note: launch-spec and capability checks not run"
            " (give --config or --capabilities)"
        )
    check = verdict.check
    for kid in sorted(check.unknown):
        print(f"  note: signature from an unknown key {cut(kid, 20) or '(no keyid)'}")
    for kid in sorted(check.invalid):
        name = policy.keys[kid].name
        print(f"  note: bad signature claiming signer {name!r} (ignored)")
    return 0 if allowed else 1
