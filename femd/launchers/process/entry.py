"""The entry step of a ``process`` task: cgroup, rlimits, then the task user.

Owns the command that runs before bwrap on this host: ``/bin/sh`` (femd's
identity) writes its own pid into the task's cgroup, then execs ``prlimit``
(file size, open files, no core dumps, a CPU time backstop) and, when femd is
root, ``setpriv`` to the task user. No task code ever runs outside the cgroup.
"""

from __future__ import annotations

import math
import shutil
from typing import Final

import msgspec

from femd.launchers import LaunchSpec
from femd.launchers.cgroup import TaskCgroup
from femd.launchers.process.sandbox import HOST_PATH
from femd.launchers.profile import ProcessSettings

__all__ = ["TaskUser", "entry_prefix"]

# The entry step: write our pid into every cgroup.procs given, then exec the
# rest (after "--"). Runs as femd, before any task code.
_ENTER: Final = (
    'for f; do shift; [ "$f" = -- ] && exec "$@"; '
    'echo $$ > "$f" || exit 125; done; exit 125'  # 125: capture.STEP_FAILED
)


class TaskUser(msgspec.Struct, frozen=True):
    """The user a task runs as; ``switch``: femd is root and drops to it."""

    uid: int
    gid: int
    switch: bool  # femd is root: drop to this user


def entry_prefix(
    settings: ProcessSettings,
    spec: LaunchSpec | None,
    user: TaskUser,
    cgroup: TaskCgroup | None,
) -> list[str]:
    """``sh`` (enter the cgroup) ``prlimit ... [setpriv ...] --``, before bwrap."""
    mb = 1 << 20
    cores = max(1, math.ceil(spec.limits.cpus)) if spec else 1
    cpu_s = (spec.limits.timeout_s if spec else 30) * cores + 5
    limits = {
        "cpu": cpu_s,  # a backstop: the timeout kills the cgroup first
        "fsize": settings.fsize_mb * mb,
        "nofile": settings.nofile,
        "core": 0,  # SECURITY: a core dump would copy task memory (data) out
    }
    procs = cgroup.procs_files() if cgroup is not None else []
    cmd = [shutil.which("sh", path=HOST_PATH) or "/bin/sh", "-c", _ENTER]
    cmd += ["femd-enter", *procs, "--"]
    cmd.append(shutil.which("prlimit", path=HOST_PATH) or "prlimit")
    cmd += [f"--{k}={v}:{v + 5 if k == 'cpu' else v}" for k, v in limits.items()]
    cmd.append("--")
    if user.switch:
        # SECURITY: tasks never run as root: no supplementary groups, then
        # gid, then uid (setpriv, util-linux), after the cgroup write.
        setpriv = shutil.which("setpriv", path=HOST_PATH) or "setpriv"
        cmd += [setpriv, f"--regid={user.gid}", f"--reuid={user.uid}"]
        cmd += ["--clear-groups", "--"]
    return cmd
