"""The doctor's launcher check: the probe, then a trivial real task.

Owns the trivial task's spec and running it, and what a failure means (hints
naming the fix). What the trivial task is comes from each launcher's
registration (``Registration.trial``: podman's one-file image is the podman
package's). Does not build the launchers (``femd.launchers`` does) nor print
anything.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path
from typing import Final

from femd.doctor.report import Check
from femd.errors import FemdError, cut
from femd.launchers import Capabilities, LauncherEnv, LaunchSpec, Limits, Trial
from femd.launchers.profile import LauncherProfile

__all__ = ["check_launcher", "enforces_all"]

TRIAL_TIMEOUT_S: Final = 60
# What a failed trivial task's error means, and what fixes it (first match).
_HINTS: Final = (
    (
        ("container-init", "catatonit"),
        "Podman's container init is missing: apt-get install catatonit",
    ),
    (
        ("subuid", "subgid", "newuidmap", "newgidmap", "uid_map", "gid_map"),
        "the podman user's subordinate ids are broken: check its lines in "
        "/etc/subuid and /etc/subgid (run /usr/share/femd/setup-podman-user.sh)",
    ),
    (
        ("session key", "keyctl"),
        "the kernel keyring is refused here (a container or seccomp filter "
        "blocks keyctl): allow keyctl, or set `keyring = false` under "
        "[containers] in femd-podman's containers.conf",
    ),
    (
        ("seccomp", "operation not permitted"),
        "a seccomp or security filter refused a system call the sandbox needs: "
        "check the profile's seccomp setting and the unit's SystemCallFilter",
    ),
    (
        ("no such file or directory", "not installed"),
        "a program the launcher needs is missing: run scripts/install.sh, or "
        "reinstall the femd package",
    ),
)


def _hint(text: str) -> str | None:
    low = text.lower()
    for needles, fix in _HINTS:
        if any(n in low for n in needles):
            return fix
    return None


def _capability_lines(c: Capabilities) -> tuple[str, ...]:
    def yes(flag: bool) -> str:
        return "yes" if flag else "NO"

    lines = [
        f"enforces: memory {yes(c.memory_limit)}, cpus {yes(c.cpu_limit)}"
        f" (min {c.min_cpus:g}), pids {yes(c.pids_limit)},"
        f" egress {yes(c.egress)}, ingress {yes(c.ingress)}"
    ]
    lines += [f"{limit} limit: {how}" for limit, how in c.enforcement]
    lines += [f"problem: {p}" for p in c.problems]
    lines += [f"note: {n}" for n in c.notes]
    return tuple(lines)


def enforces_all(c: Capabilities) -> bool:
    """True when tasks can run: available, and memory, cpu and pids enforced."""
    return c.available and c.memory_limit and c.cpu_limit and c.pids_limit


def _trial_spec(
    launcher: str, profile: LauncherProfile, out: Path, trial: Trial
) -> LaunchSpec:
    return LaunchSpec(
        task_id=f"doctor-{secrets.token_hex(6)}",
        launcher=launcher,
        profile=profile,
        argv=trial.argv,
        image=trial.image,
        output_dir=str(out),
        limits=Limits(cpus=1, memory_mb=256, timeout_s=TRIAL_TIMEOUT_S, pids=256),
    )


def _trial(
    name: str, profile: LauncherProfile, env: LauncherEnv, work_root: Path
) -> tuple[bool, str]:
    """Run launcher *name*'s trivial task; (succeeded, what happened)."""
    from femd.launchers import registration

    work = work_root / f"doctor-{secrets.token_hex(4)}"
    began = time.monotonic()
    try:
        (work / "out").mkdir(parents=True)
        registered = registration(name)
        registered.prepare_work(work)
        trial = registered.trial_for(profile, env)
        spec = _trial_spec(name, profile, work / "out", trial)
        # Not start(): a launcher's trial may waive what this host lacks
        # (podman's memory/cpu on rootless cgroup v1) to prove the runtime.
        handle = trial.launcher.launch(spec)
        outcome = handle.wait(TRIAL_TIMEOUT_S + 30)
        if outcome is None:
            handle.cancel(1)
            return False, f"the trivial task did not end in {TRIAL_TIMEOUT_S} s"
        log = b"".join(handle.logs()).decode(errors="replace").strip()
    except FemdError as e:
        return False, f"the trivial task could not start: {e}"
    except Exception as e:  # noqa: BLE001 (a back-end's foreign error, reported)
        return False, f"the trivial task could not start: {type(e).__name__}: {cut(e)}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - began
    if outcome.state != "succeeded":
        why = outcome.reason or (log.splitlines() or [""])[-1]
        return False, (
            f"the trivial task {outcome.state} (exit code {outcome.exit_code}): "
            f"{cut(why, 200)}"
        )
    return True, f"a trivial task ran in {took:.1f} s"


def check_launcher(
    profile_name: str,
    name: str,
    caps: Capabilities,
    profile: LauncherProfile,
    env: LauncherEnv,
    *,
    work_root: Path,
) -> Check:
    """Probe result plus a trivial real task through launcher *name*.

    *env*: the launcher's environment (``launchers.environment``); its
    registration's ``trial`` says what the trivial task is.

    A launcher that runs the task but cannot enforce every limit is a
    warning: femd refuses its tasks (``launcher.unenforceable``), it does not
    run them weaker.
    """
    title = f"{name} (profile {profile_name})"
    details = _capability_lines(caps)
    if not caps.available:
        problems = "; ".join(caps.problems) or "unknown reason"
        return Check(
            name=title,
            status="fail",
            summary=f"UNAVAILABLE: {cut(problems, 200)}",
            fix=_hint(problems),
            details=details,
        )
    ok, what = _trial(name, profile, env, work_root)
    if not ok:
        return Check(
            name=title, status="fail", summary=what, fix=_hint(what), details=details
        )
    if not enforces_all(caps):
        return Check(
            name=title,
            status="warn",
            summary=f"{what}, but not every limit can be enforced here: "
            "its tasks are refused (launcher.unenforceable)",
            details=details,
        )
    return Check(name=title, status="ok", summary=what, details=details)
