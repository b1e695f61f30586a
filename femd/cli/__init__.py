"""The ``femd`` command line: argument parsing, output, exit codes.

Owns how commands are spelled and what they print; the work is done by the
modules they call. One module per command group adds its commands to the
parser built here. Every failure is one line on stderr, never a traceback:
one ``except FemdError`` and one last-resort ``except Exception``.
Exit codes (DESIGN "command line"): 0 ok/allow, 1 deny, 2 error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from femd import __version__
from femd.cli.console import Parser
from femd.errors import FemdError, cut

__all__ = ["main"]

logger = logging.getLogger("femd")


# The command modules (femd.cli.<name>), in the order `femd --help` lists them.
_GROUPS = (
    "signing",
    "check",
    "policy",
    "run",
    "orchestrator",
    "doctor",
    "tasks",
    "fem",
)
# `femd run` (systemd's ExecStart) parses with its own module only: the agent
# does not import every other command's module (start-up time, RSS at rest).
_ALONE = {"run": ("run",)}


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``femd`` parser; only the agent's own command's when *argv* runs it."""
    p = Parser(prog="femd", description="Federated Execution Manager daemon")
    p.add_argument("--version", action="version", version=f"femd {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    # The global options take no value: the first other word is the command.
    command = next((a for a in argv if not a.startswith("-")), None)
    for name in _ALONE.get(command or "", _GROUPS):
        importlib.import_module(f"femd.cli.{name}").add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok/allow, 1 deny, 2 error)."""
    parser = _parser(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="femd: %(levelname)s: %(message)s",
    )
    # pika logs every failed connection attempt with a traceback at ERROR;
    # femd's broker module says the same in one line.
    logging.getLogger("pika").setLevel(
        logging.DEBUG if args.verbose else logging.CRITICAL
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except FemdError as e:
        print(f"femd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("femd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 2
    except Exception as e:
        logger.debug("internal error", exc_info=True)
        print(
            f"femd: internal error: {type(e).__name__}: {cut(e, 160)}", file=sys.stderr
        )
        return 2
