"""What a Slurm cluster can enforce, read from ``scontrol show config`` (pure).

Owns ``parse_config()`` and ``assess()``: from the configuration text to the
limits Slurm enforces for femd's jobs and why the others are not. Runs nothing.

- memory: only with ``TaskPlugin`` ``task/cgroup`` and ``ConstrainRAMSpace``
  (cgroup.conf): ``--mem`` alone is a scheduling hint, not a limit.
- cpus: only with ``task/cgroup`` and ``ConstrainCores`` (a cpuset of the
  allocated cores); whole cpus, so at least 1.
- pids: not a Slurm limit; the sandbox's RLIMIT_NPROC on the compute node.
- time: ``--time`` always (minutes, Slurm's granularity); femd cancels at the
  exact timeout itself.
- network: none (the launcher refuses tasks that ask for some).
"""

from __future__ import annotations

import msgspec

__all__ = ["ClusterLimits", "assess", "parse_config"]


def parse_config(text: str) -> dict[str, str]:
    """``Key = Value`` lines of ``scontrol show config`` (cgroup.conf included)."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip() and " " not in key.strip():
            config[key.strip()] = value.strip()
    return config


class ClusterLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What the cluster enforces for a job, with the reasons for what it does not."""

    memory: bool
    cpus: bool
    accounting: bool
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _yes(value: str | None) -> bool:
    return (value or "").lower() in ("yes", "true", "1")


def assess(config: dict[str, str]) -> ClusterLimits:
    """Read the limits Slurm enforces from *config* (``parse_config()``)."""
    tasks = config.get("TaskPlugin", "")
    cgroup = "task/cgroup" in tasks
    memory = cgroup and _yes(config.get("ConstrainRAMSpace"))
    cpus = cgroup and _yes(config.get("ConstrainCores"))
    problems: list[str] = []
    if not cgroup:
        problems.append(
            f"slurm: TaskPlugin is {tasks or 'unset'!r}, not task/cgroup:"
            " no memory or cpu limit is enforced on the compute nodes"
        )
    else:
        if not memory:
            problems.append(
                "slurm: cgroup.conf ConstrainRAMSpace is not yes:"
                " --mem is not enforced as a memory limit"
            )
        if not cpus:
            problems.append(
                "slurm: cgroup.conf ConstrainCores is not yes:"
                " --cpus-per-task is not enforced as a cpu limit"
            )
    notes = [
        "memory: Slurm's cgroup (--mem, ConstrainRAMSpace)",
        "cpus: whole cpus, Slurm's cgroup cpuset (--cpus-per-task)",
        "pids: RLIMIT_NPROC of the job's user on the compute node",
        "time: femd cancels at the timeout; --time (whole minutes) backs it",
        "network: none (own empty namespace on the compute node)",
    ]
    proctrack = config.get("ProctrackType", "")
    if proctrack != "proctrack/cgroup":
        notes.append(
            f"ProctrackType is {proctrack or 'unset'!r}: a job's processes are"
            " tracked without cgroups (the sandbox's pid namespace still ends"
            " with the job)"
        )
    storage = config.get("AccountingStorageType", "")
    accounting = storage.endswith("/slurmdbd")
    if not accounting:
        notes.append(
            f"AccountingStorageType is {storage or 'unset'!r}: no sacct, so the"
            " terminal event carries only what the controller still knows"
        )
    return ClusterLimits(
        memory=memory,
        cpus=cpus,
        accounting=accounting,
        problems=tuple(problems),
        notes=tuple(notes),
    )
