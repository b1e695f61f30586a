"""A task's launch spec: what the agent hands a launcher, built in one place.

Owns turning an admitted ``Task`` + launcher profile + policy into a
``LaunchSpec`` (site settings merged, limits resolved against the project's
maxima, host paths of inputs, code and runtime mounted at their targets).
Admission builds one with placeholder paths to check it before staging; the
runner builds the real one after stage-in. Runs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

from femd.launchers import LauncherProfile, LaunchSpec, Limits, Mount
from femd.manifest import NetworkEgress, Task
from femd.policy import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY_MB,
    DEFAULT_PIDS,
    DEFAULT_TIMEOUT_S,
    LoadedPolicy,
)

__all__ = [
    "CODE_TARGET",
    "build_spec",
    "effective_limits",
    "output_cap",
    "runtime_target",
]

CODE_TARGET: Final = "/src"


def effective_limits(task: Task, policy: LoadedPolicy) -> Limits:
    """The limits the task runs with: what it asked, else the project's maxima."""
    project = policy.policy.projects[task.project]
    most = policy.limits(project)
    r = task.resources
    return Limits(
        cpus=r.cpus or most.cpus or DEFAULT_CPUS,
        memory_mb=r.memory_mb or most.memory_mb or DEFAULT_MEMORY_MB,
        timeout_s=r.timeout_s or most.timeout_s or DEFAULT_TIMEOUT_S,
        pids=r.pids or most.pids or DEFAULT_PIDS,
    )


def output_cap(task: Task, policy: LoadedPolicy) -> int:
    """Bytes of outputs this task may send."""
    most = policy.max_output_bytes(policy.policy.projects[task.project])
    asked = task.outputs.max_bytes
    return most if asked is None else min(asked, most)


def runtime_target(task: Task, policy: LoadedPolicy) -> str:
    """Where the task's runtime is mounted: the path the policy names for it."""
    if task.runtime is None:
        raise RuntimeError("runtime_target() of a task without a runtime")
    return policy.policy.runtimes[task.runtime].path


def build_spec(
    task: Task,
    policy: LoadedPolicy,
    profile: LauncherProfile,
    *,
    work_dir: Path,
    code_dir: Path | None = None,
    inputs: Mapping[str, Path] | None = None,
    runtime_dir: Path | None = None,
    log_max_bytes: int = 1 << 20,
) -> LaunchSpec:
    """Build the launch spec: site settings from the profile, paths from the policy.

    *inputs* maps in-sandbox mount targets to resolved host paths (stage-in
    did that); None leaves them out (admission-time capability checks).
    """
    mounts = [Mount(source=str(src), target=dst) for dst, src in (inputs or {}).items()]
    if task.runtime is not None and runtime_dir is not None:
        # A runtime is the node's own, read-only, at the path its policy names.
        mounts.append(
            Mount(source=str(runtime_dir), target=runtime_target(task, policy))
        )
    workdir = None
    if task.source is not None and code_dir is not None:
        mounts.append(Mount(source=str(code_dir), target=CODE_TARGET))
        workdir = CODE_TARGET
        if task.source.path not in (".", ""):
            workdir = f"{CODE_TARGET}/{task.source.path.strip('/')}"
    egress = task.network.allow if isinstance(task.network, NetworkEgress) else None
    net = policy.policy.projects[task.project].network
    peers = () if net == "none" or net.ingress is None else net.ingress.peers
    return LaunchSpec(
        task_id=task.id,
        launcher=task.launcher,
        profile=profile,
        argv=task.command,
        env=tuple(sorted(task.env.items())),
        image=task.image,
        mounts=tuple(mounts),
        workdir=workdir,
        output_dir=str(work_dir / "out"),
        output_target=task.outputs.path,
        limits=effective_limits(task, policy),
        egress=egress,
        listen=task.network.listen,
        ingress_peers=peers if task.network.listen else (),
        log_max_bytes=log_max_bytes,
        output_max_bytes=output_cap(task, policy),
    )
