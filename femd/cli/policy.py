"""``femd policy lint`` and ``femd policy schema``: tools for data stewards.

Owns those commands' output; loading and linting are ``femd.policy``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from femd.cli.console import Parser, Subcommands

__all__ = ["add_commands"]


def add_commands(sub: Subcommands) -> None:
    """Add ``policy lint`` and ``policy schema`` to the ``femd`` parser."""
    s = sub.add_parser("policy", help="policy tools")
    psub = s.add_subparsers(dest="policy_command", required=True, parser_class=Parser)
    t = psub.add_parser("lint", help="validate a policy file or directory")
    t.add_argument("policy")
    t.set_defaults(func=_cmd_policy_lint)
    t = psub.add_parser("schema", help="print the policy JSON Schema")
    t.set_defaults(func=_cmd_policy_schema)


def _cmd_policy_lint(args: argparse.Namespace) -> int:
    from femd.policy import lint_file, lint_warnings, load_policy

    problems = lint_file(Path(args.policy))
    for p in problems:
        print(f"femd: error: {p}", file=sys.stderr)
    for w in lint_warnings(Path(args.policy)):
        print(f"femd: warning: {w}", file=sys.stderr)
    if problems:
        return 2
    policy = load_policy(Path(args.policy)).policy
    print(
        f"ok: {args.policy}: node {policy.node}, {len(policy.signers)} signer(s), "
        f"{len(policy.projects)} project(s), {len(policy.datasets)} dataset(s)"
    )
    return 0


def _cmd_policy_schema(args: argparse.Namespace) -> int:
    from femd.policy import policy_schema

    print(json.dumps(policy_schema(), indent=2, sort_keys=True))
    return 0
