"""Start-to-exit time of a trivial task through each femd launcher vs the bare tool.

    .venv/bin/python bench/launch.py [--n 30] [--json FILE]

Runs as root. Issue 5's target: femd / bare <= 1.2x. In one run, interleaved:

- process: `femd.launchers.start(launcher, spec)` + `handle.wait()` for a
  LaunchSpec running `/usr/bin/true` (profile launchers/default.yaml), against a
  bare `bwrap --unshare-all ... /usr/bin/true` as femd-task. Also
  `launcher.launch(spec)` alone, which skips the capability probe that
  `start()` runs first (for the process launcher, the probe is itself a full
  sandbox start), to show where the time goes.
- podman: a rootless `podman system service` as femd-podman (testbed.podman)
  and the busybox test image; `podman run --rm --network none IMAGE true` as
  femd-podman is the bare figure. If femd refuses podman tasks on this host
  because their limits cannot be enforced, that is printed instead of a femd
  figure; the launcher's overhead is then measured with the test-only
  `testbed.podman.unenforced_launcher` (no memory/cpu limits) and labelled as such.

Figures are medians (p95 in the note). No assertions.
"""

from __future__ import annotations

import argparse
import grp
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from latency import Row, bare_bwrap_once, percentile, print_rows, settle  # noqa: E402

from femd.config import PodmanConfig  # noqa: E402
from femd.errors import FemdError  # noqa: E402
from femd.launchers import (  # noqa: E402
    LAUNCHERS,
    Launcher,
    LaunchSpec,
    Limits,
    environment,
    load_profiles,
    start,
    unenforceable,
)

TARGET = 1.2
_ids = itertools.count()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Bench:
    """A scratch root (mode set per launcher) and one spec factory."""

    def __init__(self, launcher: str, root: Path) -> None:
        self.launcher = launcher
        self.root = root
        self.profile = load_profiles(REPO / "launchers")["default"]

    def spec(self, argv: tuple[str, ...], image: str | None = None) -> LaunchSpec:
        out = self.root / f"out-{next(_ids)}"
        out.mkdir(mode=0o755)
        return LaunchSpec(
            task_id=f"bench-{os.getpid()}-{next(_ids)}",
            launcher=self.launcher,  # type: ignore[arg-type]
            profile=self.profile,
            argv=argv,
            image=image,
            output_dir=str(out),
            limits=Limits(cpus=1, memory_mb=256, timeout_s=30, pids=1024),
        )

    def run(self, launcher: Launcher, spec: LaunchSpec, *, probe: bool = True) -> None:
        handle = start(launcher, spec) if probe else launcher.launch(spec)
        outcome = handle.wait(60)
        if outcome is None or outcome.state != "succeeded":
            why = outcome.reason or outcome.log_tail if outcome else "no outcome"
            raise RuntimeError(f"{spec.task_id}: {why}")


def retry(fn: Callable[[], object], tries: int = 3) -> float:
    """Time *fn*; on a failure (a busy host), let it settle and try again."""
    for attempt in range(tries):
        try:
            return timed(fn)
        except (RuntimeError, FemdError):
            if attempt == tries - 1:
                raise
            settle()
    raise AssertionError("unreachable")


def stats(name: str, values: list[float], base: list[float] | None, note: str) -> Row:
    ms = 1000.0
    fig = percentile(values, 0.5) * ms
    ref = percentile(base, 0.5) * ms if base else None
    ratio = fig / ref if ref else None
    note = f"p95 {percentile(values, 0.95) * ms:.1f} ms. {note}".strip()
    if ratio is not None:
        note += f" target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'}"
    return Row(name, fig, ref, "ms", ratio, note)


def process_rows(n: int) -> list[Row]:
    root = Path(tempfile.mkdtemp(prefix="femd-bench-launch-"))
    root.chmod(0o711)  # femd-task must reach its output dir
    try:
        bench = Bench("process", root)
        launcher = LAUNCHERS["process"].factory(
            bench.profile, environment("process", root / "state")
        )
        settle()
        caps = launcher.probe()
        if not caps.available:
            why = "; ".join(caps.problems)
            return [
                Row("process: femd start()+wait", None, None, "ms",
                    note=f"not measured: {why}")
            ]  # fmt: skip
        argv = ("/usr/bin/true",)
        for _ in range(3):  # warm up
            bench.run(launcher, bench.spec(argv))
            bare_bwrap_once()
        femd, femd_launch, bare = [], [], []
        for _ in range(n):
            femd.append(retry(lambda: bench.run(launcher, bench.spec(argv))))
            bare.append(timed(bare_bwrap_once))
            femd_launch.append(
                retry(lambda: bench.run(launcher, bench.spec(argv), probe=False))
            )
            # Each bwrap leaves an orphan that PID 1 reaps; some hosts' init does
            # so only every ~2 s, and zombies count against femd-task's nproc.
            time.sleep(0.15)
        return [
            stats("process: femd start()+wait", femd, bare, f"n={n}, vs bare bwrap."),
            stats("  femd launch()+wait, no probe", femd_launch, bare, ""),
            stats("  bare bwrap ... true", bare, None, "as femd-task"),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def podman_rows(n: int) -> list[Row]:
    from testbed.podman import (
        PodmanService,
        PodmanServiceError,
        podman_available,
        unenforced_launcher,
    )

    why = podman_available()
    if why is not None:
        return [Row("podman launcher", None, None, "ms", note=f"not measured: {why}")]
    root = Path(tempfile.mkdtemp(prefix="femd-bench-launch-", dir="/tmp"))
    # Like the agent's work dir: the podman user may enter (group), nobody else.
    os.chown(root, 0, grp.getgrnam("femd-podman").gr_gid)
    root.chmod(0o750)
    service = PodmanService()
    try:
        service.start()
        image = service.build_busybox_image()
        bench = Bench("podman", root)
        strict = LAUNCHERS["podman"].factory(
            bench.profile,
            environment(
                "podman", root / "state", {"podman": PodmanConfig(socket=service.url)}
            ),
        )
        argv = ("/bin/true",)
        refused = unenforceable(bench.spec(argv, image), strict.probe())

        def bare_run() -> None:
            service.podman(["run", "--rm", "--network", "none", image, "true"])

        launcher: Launcher = strict
        if refused:
            env = environment(
                "podman", root / "state", {"podman": PodmanConfig(socket=service.url)}
            )
            launcher = unenforced_launcher(bench.profile, env)
        for _ in range(2):  # warm up
            bench.run(launcher, bench.spec(argv, image), probe=not refused)
            bare_run()
        femd, bare = [], []
        for _ in range(n):
            spec = bench.spec(argv, image)
            femd.append(retry(lambda s=spec: bench.run(launcher, s, probe=not refused)))  # type: ignore[misc]
            bare.append(timed(bare_run))
        rows = []
        if refused:
            message = "; ".join(dict.fromkeys(r.message for r in refused))
            rows.append(
                Row("podman: femd start()+wait", None, None, "ms",
                    note=f"REFUSED by femd on this host: {message[:160]}")
            )  # fmt: skip
            rows.append(
                stats("  podman launch() unsafe test-only", femd, bare,
                      f"n={n}; limits NOT enforced; informative only.")
            )  # fmt: skip
        else:
            rows.append(stats("podman: femd start()+wait", femd, bare, f"n={n}"))
        rows.append(stats("  bare podman run --rm true", bare, None, "as femd-podman"))
        return rows
    except PodmanServiceError as e:
        return [Row("podman launcher", None, None, "ms", note=f"not measured: {e}")]
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)


def measure(n: int, podman_n: int) -> list[Row]:
    """Both launchers; one that cannot run on this host is a "not measured" row."""
    rows: list[Row] = []
    for name, run in (
        ("process: femd start()+wait", lambda: process_rows(n)),
        ("podman: femd start()+wait", lambda: podman_rows(podman_n)),
    ):
        try:
            rows += run()
        except Exception as e:  # noqa: BLE001 (a host without it is a row)
            why = " ".join(str(e).split())[:160] or type(e).__name__
            rows.append(Row(name, None, None, "ms", note=f"not measured: {why}"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="runs per process figure")
    ap.add_argument("--podman-n", type=int, default=10, help="runs per podman figure")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/launch.py: run as root", file=sys.stderr)
        return 2
    # The podman launcher warns on every unsafe test-only launch: keep it quiet.
    logging.getLogger("femd").setLevel(logging.ERROR)
    rows = measure(args.n, args.podman_n)
    print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
