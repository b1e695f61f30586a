"""``femd run``: the agent in the foreground, as systemd starts it.

Owns the command's logging set-up (level, journald or JSON lines) and its
order: the broker link is started (``femd.earlylink``), then the launchers'
probes (``femd.earlyprobe``), before the agent is imported and built; a
SIGTERM or SIGHUP meanwhile is kept for the agent. The agent is ``femd.agent``'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from femd.cli.console import Subcommands

__all__ = ["add_commands"]


def add_commands(sub: Subcommands) -> None:
    """Add ``run`` to the ``femd`` parser."""
    s = sub.add_parser("run", help="the agent, in the foreground (systemd runs this)")
    s.add_argument(
        "--config", help="femd.yaml (default $FEMD_CONFIG, /etc/femd/femd.yaml)"
    )
    s.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from femd import audit
    from femd.config import load_config

    path = Path(args.config) if args.config else None
    config = load_config(path, os.environ)
    level = (
        logging.DEBUG if args.verbose else getattr(logging, config.log_level.upper())
    )
    logging.getLogger().setLevel(level)
    audit.configure(config.audit)
    if not audit.to_journal():
        from femd.logline import use_json_lines

        use_json_lines()
    # The broker's handshakes run while the rest of the agent is imported,
    # loads its policy and probes its launchers (femd.earlylink).
    from femd.earlylink import EarlyLink

    early = EarlyLink(config)
    # Until the agent takes the signals over, SIGTERM and SIGHUP are kept for
    # it: the probes end as they would (sandboxes, cgroups removed), then the
    # agent closes without taking a task, or reloads. (SIGINT still raises
    # KeyboardInterrupt: the probes are awaited as after any start-up error.)
    held: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda sig, _frame: held.append(sig))
    probes = None
    try:
        # The launchers are probed (sandboxes run) while the agent loads.
        from femd.earlyprobe import EarlyProbe

        probes = EarlyProbe(config, early.dirs.root)
        from femd.agent import Agent

        agent = Agent(config, config_path=path, early=early, probes=probes)
    except BaseException:
        if probes is not None:
            probes.close()
        early.close()
        raise
    return agent.run(held=held)
