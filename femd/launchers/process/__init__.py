"""The ``process`` launcher package: tasks in a bubblewrap sandbox on this host.

``launcher`` (probe, launch, adopt), ``handle`` (a running task), ``sandbox``
(bwrap's command line and the spec checks, shared with ``slurm``), ``entry``
(cgroup, rlimits, task user before bwrap), ``seccomp`` (the built-in filter).
"""

from femd.launchers.process.launcher import BubblewrapLauncher
from femd.launchers.process.sandbox import bwrap_argv, check_spec
from femd.launchers.process.seccomp import seccomp_filter, seccomp_memfd

__all__ = [
    "BubblewrapLauncher",
    "bwrap_argv",
    "check_spec",
    "seccomp_filter",
    "seccomp_memfd",
]
