"""The entry step of a ``process`` task: cgroup, rlimits, then the task user.

Owns the command that runs before bwrap on this host: ``/bin/sh`` (femd's
identity) sets the task's rlimits with its ``ulimit`` builtin (file size, open
files, no core dumps, a CPU time backstop; setrlimit, as ``prlimit`` did, one
exec fewer per launch), writes its own pid into the task's cgroup, then execs
``setpriv`` to the task user when femd is root. No task code ever runs outside
the cgroup or without its limits.
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

# The entry step: "$1".."$4" are the soft and hard CPU seconds, the file size
# in 512-byte blocks (POSIX ulimit -f) and the open files; each soft limit is
# set before its hard one (a hard limit under the soft one is refused). Then
# write our pid into every cgroup.procs given and exec the rest (after "--").
# Runs as femd, before any task code; any failure exits 125
# (capture.STEP_FAILED) and runs nothing.
_ENTER: Final = (
    'ulimit -S -t "$1" && ulimit -H -t "$2" && ulimit -S -f "$3" && '
    'ulimit -H -f "$3" && ulimit -S -n "$4" && ulimit -H -n "$4" && '
    "ulimit -S -c 0 && ulimit -H -c 0 || exit 125; shift 4; "
    'for f; do shift; [ "$f" = -- ] && exec "$@"; '
    'echo $$ > "$f" || exit 125; done; exit 125'
)
_BLOCK: Final = 512  # bytes per ``ulimit -f`` unit (POSIX)


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
    """``sh`` (rlimits, enter the cgroup) ``[setpriv ...] --``, before bwrap.

    The core size is 0 (SECURITY: a core dump would copy task memory, data,
    out); the CPU time is a backstop: the timeout kills the cgroup first.
    """
    cores = max(1, math.ceil(spec.limits.cpus)) if spec else 1
    cpu_s = (spec.limits.timeout_s if spec else 30) * cores + 5
    fsize_blocks = settings.fsize_mb * (1 << 20) // _BLOCK
    procs = cgroup.procs_files() if cgroup is not None else []
    cmd = [shutil.which("sh", path=HOST_PATH) or "/bin/sh", "-c", _ENTER]
    cmd += ["femd-enter", str(cpu_s), str(cpu_s + 5), str(fsize_blocks)]
    cmd += [str(settings.nofile), *procs, "--"]
    if user.switch:
        # SECURITY: tasks never run as root: no supplementary groups, then
        # gid, then uid (setpriv, util-linux), after the cgroup write.
        setpriv = shutil.which("setpriv", path=HOST_PATH) or "setpriv"
        cmd += [setpriv, f"--regid={user.gid}", f"--reuid={user.uid}"]
        cmd += ["--clear-groups", "--"]
    return cmd
