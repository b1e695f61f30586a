"""``femd doctor``: what this host can enforce, per launcher.

Owns the command's set-up (profiles from ``--config`` or ``--launchers``,
trial work dirs) and which checks run; the checks and the report are
``femd.doctor``'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from femd.cli.console import Subcommands

__all__ = ["add_commands"]


def add_commands(sub: Subcommands) -> None:
    """Add ``doctor`` to the ``femd`` parser."""
    s = sub.add_parser("doctor", help="what this host can enforce, per launcher")
    s.add_argument("--config", help="femd.yaml (for launchers, state_dir, podman)")
    s.add_argument("--launchers", help="a profiles directory instead of --config")
    s.add_argument("--podman-socket", help="the rootless Podman API socket URL")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from femd import doctor
    from femd.admission import host_report
    from femd.config import PodmanConfig, load_config
    from femd.launchers import build_all, environment, load_profiles
    from femd.statedir import StateDir

    config = None
    if args.launchers:
        profiles_dir = Path(args.launchers)
    else:
        config = load_config(Path(args.config) if args.config else None, os.environ)
        profiles_dir = Path(config.launchers)
    profiles = load_profiles(profiles_dir)
    if not args.verbose:  # the trial launcher's own warning: doctor says it
        logging.getLogger("femd.launchers.podman").setLevel(logging.ERROR)
    # Trial work dirs: as root in a private scratch dir (prepare_work opens
    # its parents for the sandbox users), as femd in its own state dir.
    scratch = Path(tempfile.mkdtemp(prefix="femd-doctor-"))
    if os.geteuid() != 0 and config is not None:
        work_root = StateDir(config.state_path).doctor
    else:
        work_root = scratch / "doctor"
    checks: list[doctor.Check] = []
    usable: list[str] = []
    try:
        work_root.mkdir(parents=True, exist_ok=True)
        # Each launcher's section of femd.yaml; --podman-socket overrides podman's.
        configs = dict(config.launcher_configs()) if config is not None else {}
        if args.podman_socket:
            configs["podman"] = PodmanConfig(socket=args.podman_socket)
        _, caps = build_all(profiles, state_dir=scratch, configs=configs)
        for (pname, lname), cap in caps.items():
            env = environment(lname, scratch, configs)
            check = doctor.check_launcher(
                pname, lname, cap, profiles[pname], env, work_root=work_root
            )
            checks.append(check)
            if check.status != "fail" and doctor.enforces_all(cap):
                usable.append(f"{lname} ({pname})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if work_root.parent != scratch:
            shutil.rmtree(work_root, ignore_errors=True)
    if config is not None:
        b = config.broker
        checks += doctor.check_broker(
            b.url, Path(b.ca), Path(b.cert), Path(b.key), config.node,
            timeout_s=b.connect_timeout_s,
        )  # fmt: skip
        checks.append(doctor.check_policy(Path(config.policy), config.node))
        checks.append(doctor.check_state_dir(config.state_path))
        checks.append(doctor.check_clock(config.clock_skew_s))
    if args.json:
        report = host_report(profiles, caps)
        sys.stdout.buffer.write(doctor.to_json(checks, usable, report) + b"\n")
    else:
        sys.stdout.write(doctor.render(checks, usable))
    return doctor.exit_code(checks, usable)
