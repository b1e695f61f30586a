"""Work-dir hooks: who may reach a task's work directory, per launcher.

Owns the ``prepare_work`` hooks of the registry (``LAUNCHERS``): the agent
creates ``<state_dir>/work/<task id>/out`` and the task's launcher opens the
path to the user its sandbox runs as, and to nobody else. Does not create or
remove work dirs (``execution`` does).
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

__all__ = ["open_work", "podman_work"]


def open_work(work: Path) -> None:
    """Tasks run as femd's own user, or (femd is root) as a separate one.

    Under the unit, femd and its tasks share the ``femd`` user: 0750 is enough
    and "other" stays shut. When femd runs as root (tests, some installs)
    tasks run as another user, who must traverse, not list, the path: 0711.
    """
    work_root = work.parent
    if os.geteuid() != 0:
        for d in (work_root, work):
            d.chmod(0o750)
        return
    for d in (work_root.parent, work_root, work):
        d.chmod(0o711)


def podman_work(work: Path) -> None:
    """Containers run as ``femd-podman``, which reaches work dirs by group.

    Under the unit femd-podman is in group ``femd``: 0750 is enough. When femd
    runs as root, the work dir goes to group ``femd-podman`` (0710; podman's
    output FIFO, writable by any uid, needs a closed parent) and its parents
    are 0711.
    """
    if os.geteuid() != 0:
        open_work(work)
        return
    try:
        gid = grp.getgrnam("femd-podman").gr_gid
    except KeyError:
        gid = -1
    for d in (work.parent.parent, work.parent):
        d.chmod(0o711)
    os.chown(work, -1, gid)
    work.chmod(0o710)
