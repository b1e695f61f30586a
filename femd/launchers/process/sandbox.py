"""The ``process`` sandbox itself: bubblewrap's command line and its checks.

Owns what a bubblewrap sandbox is (namespaces, binds, read-only root, output
tmpfs, seccomp descriptors, environment) and the checks a spec must pass to
run in one. Shared by every launcher that runs tasks in this sandbox
(``process`` on this host, ``slurm`` on compute nodes). Does not start
anything, enter cgroups or drop privileges (``entry``, ``launcher``).
"""

from __future__ import annotations

import os
import shutil
from typing import Final

import msgspec

from femd.errors import LaunchError, cut
from femd.launchers import LaunchSpec
from femd.launchers.capture import tmpfs_bytes
from femd.launchers.profile import LauncherProfile, ProcessSettings
from femd.launchers.targets import PROCESS_RESERVED as _RESERVED
from femd.launchers.targets import within as _within

__all__ = ["HOST_PATH", "bwrap_argv", "check_spec"]

HOST_PATH: Final = "/usr/sbin:/usr/bin:/sbin:/bin"
_TASK_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
_TMP: Final = "/tmp"  # noqa: S108 (inside the sandbox: a private tmpfs)
_SHM: Final = "/dev/shm"  # noqa: S108 (inside the sandbox: a private tmpfs)
# Namespaces every sandbox gets (bwrap always adds a mount namespace). No uts
# namespace: the task sees the host's hostname and cannot change it (it holds
# no capability over the host's UTS namespace; under femd.service,
# ProtectHostname= also forbids sethostname), and bwrap's --hostname would be
# refused there. No cgroup namespace: /proc/self/cgroup shows femd's cgroup path.
_NAMESPACES: Final = ("--unshare-user", "--unshare-ipc", "--unshare-pid")


def bwrap_argv(
    settings: ProcessSettings,
    spec: LaunchSpec | None,
    seccomp_fd: int | None,
    argv: list[str],
    status_fd: int | None = None,
    extra_seccomp_fd: int | None = None,
    net: tuple[list[tuple[str, str]], int] | None = None,
) -> list[str]:
    """The ``bwrap`` command line that runs *argv* in the sandbox of *spec*.

    *spec* None: the probe's empty sandbox. The descriptors are numbers the
    sandbox will find open: the built-in seccomp filter, bwrap's JSON status,
    the profile's extra filter; *net*: femd's binds and the block descriptor
    that holds the command until the task's network is attached.
    """
    tmp = str(settings.tmp_size_mb << 20)
    args = [shutil.which("bwrap", path=HOST_PATH) or "bwrap"]
    # SECURITY: own user, mount, pid, IPC and network namespaces; no
    # capabilities, no nested user namespaces. Not --unshare-all: it asks
    # for a cgroup namespace, and femd.service's RestrictNamespaces=
    # refuses cgroup and uts ones (see _NAMESPACES). The network is
    # always empty: femd forwards what the policy allows (TaskNetwork).
    args += [*_NAMESPACES, "--disable-userns", "--unshare-net"]
    args += ["--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if spec is not None:
        # SECURITY: the output step (capture) is the sandbox's PID 1: the
        # kernel ignores the task's signals to it, so it cannot be killed
        # before it kills the rest and streams the outputs out.
        args.append("--as-pid-1")
    args.append("--clearenv")
    env = {"PATH": _TASK_PATH, "HOME": _TMP} | dict(spec.env if spec else ())
    for key, value in env.items():
        args += ["--setenv", key, value]
    for path in settings.ro_binds:
        # merged-/usr links (/bin -> usr/bin) are recreated; others followed.
        link = os.readlink(path) if os.path.islink(path) else "/"
        if not link.startswith("/"):
            args += ["--symlink", link, path]
        else:
            args += ["--ro-bind-try", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--size", tmp, "--tmpfs", _SHM, "--size", tmp, "--tmpfs", _TMP]
    workdir = _TMP
    if spec is not None:
        for m in spec.mounts:
            args += ["--ro-bind", m.source, m.target]
        # SECURITY: the output dir holds at most the cap at any moment
        # (tmpfs size, not file sizes); capture brings it out.
        size = str(tmpfs_bytes(spec.output_max_bytes))
        args += ["--size", size, "--tmpfs", spec.output_target]
        workdir = spec.workdir or workdir
    for source, target in net[0] if net else ():
        args += ["--ro-bind", source, target]  # femd's /etc/hosts...
    # SECURITY: nothing else is writable: the root and /dev become read-only.
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", workdir]
    for fd in (seccomp_fd, extra_seccomp_fd):
        if fd is not None:
            args += ["--add-seccomp-fd", str(fd)]
    if status_fd is not None:
        args += ["--json-status-fd", str(status_fd)]
    if net is not None:
        args += ["--block-fd", str(net[1])]  # until femd's forwarders listen
    return [*args, "--", *argv]


def check_spec(spec: LaunchSpec, settings: ProcessSettings) -> None:
    """Refuse a spec this sandbox cannot run as asked.

    Raises:
        LaunchError: the spec is malformed, a path is relative, argv or the
            environment holds a NUL byte, a mount target overlaps a reserved
            path or another target, a mount is writable or its source missing.
    """
    # The profile was validated when loaded (with every registered section);
    # the rest of the spec is checked again here, strictly.
    bare = LauncherProfile(
        api_version="femd/v1", kind="LauncherProfile", name=spec.profile.name
    )
    data = msgspec.to_builtins(msgspec.structs.replace(spec, profile=bare))
    try:
        msgspec.convert(data, LaunchSpec, strict=True)
    except msgspec.ValidationError as e:
        raise LaunchError(f"process: invalid launch spec: {cut(e, 160)}") from e
    paths = [spec.output_dir, *(m.source for m in spec.mounts)]
    if spec.workdir is not None:
        paths.append(spec.workdir)
    if not all(os.path.isabs(p) and "\0" not in p for p in paths):
        raise LaunchError("process: output, mount and work dirs must be absolute")
    if not spec.argv or any("\0" in a for a in spec.argv):
        raise LaunchError("process: argv is empty or holds a NUL byte")
    for key, value in spec.env:
        if not key.isidentifier() or not key.isascii() or "\0" in value:
            raise LaunchError(f"process: invalid environment variable {cut(key)!r}")
    targets = [m.target for m in spec.mounts] + [spec.output_target]
    reserved = [*_RESERVED, *settings.ro_binds]
    for i, target in enumerate(targets):
        clash = [r for r in reserved if _within(r, target) or _within(target, r)]
        clash += [
            t for t in targets[i + 1 :] if _within(t, target) or _within(target, t)
        ]
        if clash:
            raise LaunchError(
                f"process: mount target {cut(target)!r} overlaps {cut(clash[0])!r}"
            )
    for m in spec.mounts:
        if not m.read_only:
            # DESIGN "Launchers": inputs read-only, one writable output dir.
            raise LaunchError(f"process: mount {cut(m.target)!r} must be read-only")
        if not os.path.exists(m.source):
            raise LaunchError(f"process: mount source {cut(m.source)!r} is missing")
