"""The ``slurm`` section of a launcher profile, and the checks of a slurm spec.

Owns ``SlurmSettings`` (registered as the ``slurm`` launcher's profile
section: ``LAUNCHERS``) and ``spec_reasons`` (a job runs the task in the
``process`` sandbox, so its targets are checked like a process task's against
the job's sandbox settings). Imports nothing of the launcher itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import Meta

from femd.launchers.profile import ProcessSettings
from femd.launchers.targets import sandbox_reasons
from femd.model import AbsPath, Strict

if TYPE_CHECKING:
    from femd.decision import Reason
    from femd.launchers import LaunchSpec

__all__ = ["SlurmSettings", "spec_reasons"]

SlurmName = Annotated[
    str,
    Meta(
        pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$(?!\n)",
        description="A Slurm partition, account or QOS name.",
    ),
]


class SlurmSettings(Strict, frozen=True, kw_only=True):
    """How the `slurm` launcher hands a task to the site's Slurm as a batch job.

    The job runs the task on a compute node in the same bubblewrap sandbox as
    the `process` launcher (`sandbox`); Slurm's cgroups enforce memory and
    cpus, its time limit backs femd's own timeout.
    """

    stage_dir: AbsPath
    """A directory on the cluster's shared filesystem, at the same path on this
    host and on every compute node: each task gets a subdirectory holding its
    job script, inputs, code and output directory while it runs."""
    shared: tuple[AbsPath, ...] = ()
    """Host paths the compute nodes see at the same place (e.g. `/gpfs/data`):
    inputs under them are bound in place; other inputs are copied to
    `stage_dir`."""
    partition: SlurmName | None = None
    """`--partition` of every job; the cluster's default when absent."""
    account: SlurmName | None = None
    """`--account` of every job; the user's default when absent."""
    qos: SlurmName | None = None
    """`--qos` of every job."""
    slurm_conf: AbsPath | None = None
    """`SLURM_CONF` for the client commands; the system's when absent."""
    poll_s: Annotated[float, Meta(ge=0.1, le=60)] = 1.0
    """How often a running job's state is asked of Slurm."""
    sandbox: ProcessSettings = msgspec.field(default_factory=ProcessSettings)
    """The bubblewrap sandbox on the compute node (`run_as`: the job's user
    when femd runs as root)."""


def spec_reasons(spec: LaunchSpec) -> list[Reason]:
    """Every target of *spec* the job's bubblewrap sandbox keeps for itself."""
    settings = spec.profile.section("slurm")
    if not isinstance(settings, SlurmSettings):
        return []
    return sandbox_reasons(spec, settings.sandbox.ro_binds)
