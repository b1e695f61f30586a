"""``python -m demo [--launcher process|podman] [--fl] [--keep] [--workdir DIR]``.

``--fl`` runs the FL act instead (demo/fl_act.py): a real Flower session across
the two nodes, imported from FEM's documents; exit 0 when every round ran, the
federated model is within 2 points of the centralised one and the client asking
for an extra destination was refused.

Exit status: 0 when the pooled result equals the centralised one and the
tampered and out-of-policy tasks were refused; 1 when one of those did not hold
(or podman was asked for and this host cannot enforce its limits); 2 when the
demo could not run at all (not root, RabbitMQ missing, a step failed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

from demo.console import Console
from demo.walkthrough import STEPS, DemoError, Outcome, Walkthrough, remove


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/demo",
        description="femd demo: a federated analysis on two data nodes, here.",
    )
    p.add_argument(
        "--launcher",
        choices=["process", "podman"],
        default="process",
        help="sandbox for the task: bubblewrap (default) or rootless podman",
    )
    p.add_argument(
        "--fl",
        action="store_true",
        help="the FL act: a Flower session from FEM's documents (process launcher)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--workdir",
        type=Path,
        help="an empty or new directory to work in (default: a new temporary one)",
    )
    return p


def _workdir(asked: Path | None) -> Path:
    if asked is None:
        return Path(tempfile.mkdtemp(prefix="femd-demo-"))
    root = asked.resolve()
    if root.exists() and any(root.iterdir()):
        raise DemoError(f"--workdir {root}: not empty")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP like Ctrl-C: unwind through the clean-up code.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _summary(console: Console, outcome: Outcome, root: Path, keep: bool) -> int:
    console.out.write("\n")
    ok = not outcome.problems and outcome.podman_refused is None
    for problem in outcome.problems:
        console.bad(problem)
    if outcome.podman_refused is not None:
        console.bad(
            "--launcher podman: this host cannot enforce podman's limits; "
            "femd refused the task (see step 6)"
        )
    if outcome.pooled_agrees:
        console.good(
            f"pooled result = centralised result "
            f"(largest relative difference {outcome.max_relative:.1e})"
        )
    rules = sorted({r for rs in outcome.refusals.values() for r in rs})
    if rules:
        console.good(f"tampered and out-of-policy tasks refused: {', '.join(rules)}")
    where = (
        f"work directory kept: {root}"
        if keep
        else "work directory removed (--keep keeps the logs, policies, results)"
    )
    console.say(where)
    verdict = "demo succeeded" if ok else "demo FAILED"
    console.title(f"{verdict} in {console.elapsed():.1f} s")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit status."""
    args = _parser().parse_args(argv)
    console = Console(steps=STEPS)
    if os.geteuid() != 0:
        sys.stderr.write("demo: run as root: sudo ./scripts/demo\n")
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        root = _workdir(args.workdir)
    except DemoError as e:
        sys.stderr.write(f"demo: error: {e}\n")
        return 2
    if args.fl:
        return _fl(root, args.keep)
    console.title("femd demo: one signed task, two hospitals, a pooled answer")
    console.say(f"work directory {root}, launcher {args.launcher}")
    walk = Walkthrough(root, args.launcher, console)
    try:
        outcome = walk.run()
    except DemoError as e:
        console.bad(str(e))
        console.title(f"demo could not run: {e}")
        if not args.keep:
            remove(root)
        return 2
    except KeyboardInterrupt:
        console.bad("interrupted")
        if not args.keep:
            remove(root)
        return 130
    if not args.keep:
        remove(root)
    return _summary(console, outcome, root, args.keep)


def _fl(root: Path, keep: bool) -> int:
    from demo.fl_act import FL_STEPS, FlAct

    console = Console(steps=FL_STEPS)
    console.title("femd demo, FL act: a Flower session from FEM's documents")
    console.say(f"work directory {root}, launcher process")
    act = FlAct(root, console)
    try:
        outcome = act.run_act()
    except DemoError as e:
        console.bad(str(e))
        console.title(f"FL act could not run: {e}")
        if not keep:
            remove(root)
        return 2
    except KeyboardInterrupt:
        console.bad("interrupted")
        if not keep:
            remove(root)
        return 130
    if not keep:
        remove(root)
    console.out.write("\n")
    for problem in outcome.problems:
        console.bad(problem)
    if outcome.federated_accuracy is not None:
        console.good(
            f"federated accuracy {outcome.federated_accuracy:.2f}% vs centralised "
            f"{outcome.central_accuracy:.2f}%, {len(outcome.rounds)} rounds "
            f"({outcome.live_rounds} seen live)"
        )
    if outcome.refused:
        console.good(f"extra destination refused: {outcome.refused}")
    verdict = "FL act succeeded" if outcome.ok else "FL act FAILED"
    console.title(f"{verdict} in {outcome.act_s:.1f} s")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
