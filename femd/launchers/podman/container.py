"""The container a task runs in: the libpod SpecGenerator podman-py sends.

Owns what the sandbox is (DESIGN "Launchers"; see the package docstring):
mounts, user namespace, limits, labels and security options (the output
tmpfs and its step: ``outputs``). Does not talk to podman.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Final

from femd.errors import LaunchError, cut
from femd.launchers import Capabilities, LaunchSpec
from femd.launchers.podman.outputs import output_mounts, step_argv
from femd.launchers.podman.record import LaunchRecord
from femd.launchers.profile import PodmanSettings
from femd.launchers.targets import podman_reasons

__all__ = [
    "COLLECT_WINDOW_S",
    "CONMON_SLACK_S",
    "LABEL_LOG_MAX",
    "LABEL_OUTPUT_DIR",
    "LABEL_OUTPUT_MAX",
    "LABEL_TASK",
    "LABEL_TIMEOUT",
    "STOP_GRACE_S",
    "TASK_USER",
    "conmon_timeout_s",
    "container_spec",
    "labels_of",
]

TASK_USER: Final = "65534:65534"
"""uid:gid of the task process inside the container (never root)."""
LABEL_TASK: Final = "femd.task"
LABEL_TIMEOUT: Final = "femd.timeout_s"
LABEL_LOG_MAX: Final = "femd.log_max_bytes"
LABEL_OUTPUT_DIR: Final = "femd.output_dir"
LABEL_OUTPUT_MAX: Final = "femd.output_max_bytes"
STOP_GRACE_S: Final = 10
CONMON_SLACK_S: Final = 5
COLLECT_WINDOW_S: Final = 900
"""How long after its timeout a container whose command ended waits for an
agent to collect its outputs (the step blocks on the FIFO until one reads)."""
_AUTO_USERNS_SIZE: Final = 65536
# Paths a task mount may not cover: the sandbox's own plumbing.
_TMP: Final = "/tmp"  # noqa: S108 (the container's own tmpfs, not the host's)


def _security_options(settings: PodmanSettings) -> dict[str, Any]:
    """Map the profile's extra ``--security-opt`` values onto SpecGenerator fields.

    Raises:
        LaunchError: an unknown option, or one that would weaken the sandbox.
    """
    out: dict[str, Any] = {"selinux_opts": [], "mask": []}
    if settings.seccomp_profile is not None:
        out["seccomp_profile_path"] = settings.seccomp_profile
    for opt in settings.extra_security_opt:
        key, _, value = opt.partition("=")
        if key == "no-new-privileges" and value in ("", "true"):
            continue
        if key == "label" and value and value != "disable":
            out["selinux_opts"].append(value)
        elif key == "apparmor" and value and value != "unconfined":
            out["apparmor_profile"] = value
        elif key == "seccomp" and value.startswith("/"):
            out["seccomp_profile_path"] = value
        elif key == "mask" and value.startswith("/"):
            out["mask"] += value.split(":")
        else:
            # SECURITY: unconfined seccomp/apparmor, unmask, label=disable: never.
            raise LaunchError(f"podman: security option {cut(opt)!r} is not accepted")
    return out


def conmon_timeout_s(timeout_s: float) -> int:
    """When conmon kills a container whatever runs in it (no agent needed).

    The task's timeout, the stop's grace, some slack, and the window in which
    a task that ended while no agent ran still has its outputs collected
    (docs/design.md "Podman").
    """
    return math.ceil(timeout_s) + STOP_GRACE_S + CONMON_SLACK_S + COLLECT_WINDOW_S


def labels_of(record: LaunchRecord) -> dict[str, str]:
    """The femd labels of the container *record* describes (adopt() checks them)."""
    return {
        LABEL_TIMEOUT: f"{record.timeout_s:g}",
        LABEL_LOG_MAX: str(record.log_max_bytes),
        LABEL_OUTPUT_DIR: record.output_dir,
        LABEL_OUTPUT_MAX: str(record.output_max_bytes),
    }


def container_spec(
    spec: LaunchSpec,
    settings: PodmanSettings,
    caps: Capabilities,
    image_id: str,
    *,
    stream: Path,
    cgroup_pids: bool,
) -> dict[str, Any]:
    """The libpod SpecGenerator for *spec* (what ``podman create`` would send).

    Raises:
        LaunchError: a mount or security option the sandbox cannot accept.
    """
    mounts: list[dict[str, Any]] = [
        {
            "destination": _TMP,
            "type": "tmpfs",
            "source": "tmpfs",
            "options": [
                "rw",
                "nosuid",
                "nodev",
                "noexec",
                "mode=1777",
                f"size={settings.tmp_size_mb}m",
            ],
        },
        # SECURITY: the output dir holds at most the cap at any moment (a
        # tmpfs of that size, not file sizes); the step streams it out.
        *output_mounts(spec, stream),
    ]
    reasons = podman_reasons(spec)
    if reasons:
        raise LaunchError(f"podman: task {spec.task_id}: {reasons[0].message}")
    for m in spec.mounts:
        if not m.read_only:
            raise LaunchError(
                f"podman: task {spec.task_id}: mount {cut(m.target)} must be read-only"
            )
        if not os.path.isabs(m.source) or not os.path.exists(m.source):
            raise LaunchError(f"podman: mount source {cut(m.source)} is missing")
        mounts.append(
            {
                "destination": m.target,
                "type": "bind",
                "source": m.source,
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
        )
    userns = {"nsmode": settings.userns}
    # The CLI turns `--userns=auto` into both fields; the REST API needs both.
    idmappings = (
        {"AutoUserNs": True, "AutoUserNsOpts": {"Size": _AUTO_USERNS_SIZE}}
        if settings.userns == "auto"
        else None
    )
    limits: dict[str, Any] = {}
    if caps.memory_limit:
        size = spec.limits.memory_mb << 20
        limits["memory"] = {"limit": size, "swap": size}
    if caps.cpu_limit:
        limits["cpu"] = {"period": 100000, "quota": int(spec.limits.cpus * 100000)}
    if cgroup_pids:
        limits["pids"] = {"limit": spec.limits.pids}
    labels = {
        LABEL_TASK: spec.task_id,
        **labels_of(LaunchRecord.of(spec)),
        "femd.profile": spec.profile.name,
    }
    body: dict[str, Any] = {
        "name": f"femd-{spec.task_id}",
        "image": image_id,
        "raw_image_name": spec.image,
        "entrypoint": [],
        "command": step_argv(spec),
        "env": dict(spec.env),
        "env_host": False,
        "httpproxy": False,
        "labels": labels,
        "hostname": "femd-task",
        "user": TASK_USER,
        "userns": userns,
        **({"idmappings": idmappings} if idmappings else {}),
        "netns": {"nsmode": "none"},
        "read_only_filesystem": settings.read_only,
        "read_write_tmpfs": False,
        "privileged": False,
        "cap_drop": ["ALL"],
        "no_new_privileges": True,
        "devices": [],
        "init": True,
        "systemd": "false",
        "oci_runtime": settings.runtime,
        "mounts": mounts,
        "image_volume_mode": "ignore",
        "use_image_hosts": True,
        "use_image_resolve_conf": True,
        "umask": "0022",
        "stop_timeout": STOP_GRACE_S,
        # SECURITY: conmon kills the task even if no agent is there to wait().
        "timeout": conmon_timeout_s(spec.limits.timeout_s),
        "resource_limits": limits,
        "r_limits": [
            {"type": "nproc", "soft": spec.limits.pids, "hard": spec.limits.pids},
            {"type": "core", "soft": 0, "hard": 0},
        ],
        "log_configuration": {
            "driver": "k8s-file",
            "size": max(2 * spec.log_max_bytes, 1 << 20),
        },
        **_security_options(settings),
    }
    if spec.workdir:
        body["work_dir"] = spec.workdir
    return body
