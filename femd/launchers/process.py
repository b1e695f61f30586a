"""The ``process`` launcher: a plain process in a bubblewrap sandbox.

Owns ``BubblewrapLauncher`` and its handle: the bwrap command line, the
resource limits (its cgroup, rlimits), the built-in seccomp filter, privilege
dropping, log capture, timeout and cancellation. Does not decide what may run
(the policy does) nor collect outputs (``stageout`` does).

How each limit is enforced (``Capabilities.enforcement`` says the same):

- memory, pids, cpus: the task's own cgroup (``cgroup``: v2 in femd.service's
  delegated subtree, v1 when femd runs as root). Memory counts everything the
  task holds (anonymous, page cache, tmpfs, memfd, shm; swap off) and the OOM
  killer acts inside it; pids are per task; cpus are a CFS quota (0.5 works).
  A host with neither refuses every task (``launcher.unenforceable``). The
  entry step (``/bin/sh``, femd's identity) writes its own pid into the
  cgroup, then execs ``prlimit`` (file size, open files, no core dumps, a CPU
  time backstop), ``setpriv`` (when femd is root: to the task user) and bwrap:
  no task code ever runs outside the cgroup.
- outputs: the output directory is a tmpfs of the task's output cap, charged
  to its memory cgroup; ``capture`` streams it out when the command ends.
- network: always its own empty network namespace; what the policy allows
  (egress to named ``host:port``, ingress on named ports) is forwarded by
  femd (``network.TaskNetwork``, docs/network.md), attached while bwrap
  holds the command back (``--block-fd``).
- time: the wall-clock timeout, a cancel and the end of the task kill the
  whole cgroup, so nothing survives (double-forked, setsid'd, or a sandbox
  stuck in bwrap's setup). After an agent restart ``adopt()`` kills what a
  task left in its cgroup.

Namespaces: user, mount, pid, IPC and network; not uts nor
cgroup, which femd.service refuses (see ``_NAMESPACES``). ``probe()`` runs a
real (empty) sandbox the way a task runs, in a cgroup of its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import platform
import pwd
import selectors
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Final

import msgspec

from femd.errors import LaunchError, LauncherUnavailableError, UnenforceableError, cut
from femd.launchers import Capabilities, LaunchSpec, Outcome, unenforceable
from femd.launchers.capture import OutputCapture, tmpfs_bytes, wrap_argv
from femd.launchers.cgroup import (
    CgroupHost,
    CgroupLimits,
    TaskCgroup,
    detect,
    scope_of,
)
from femd.launchers.netns import probe_join
from femd.launchers.network import TaskNetwork
from femd.launchers.profile import LauncherProfile, ProcessSettings
from femd.launchers.targets import PROCESS_RESERVED as _RESERVED
from femd.launchers.targets import within as _within
from femd.model import TaskId
from femd.model import utc_now as _now

__all__ = ["BubblewrapLauncher", "seccomp_filter"]

logger = logging.getLogger(__name__)

_HOST_PATH: Final = "/usr/sbin:/usr/bin:/sbin:/bin"
_TASK_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
_TAIL_BYTES: Final = 8192
_TOOLS: Final = ("bwrap", "prlimit", "sh")
# The entry step: write our pid into every cgroup.procs given, then exec the
# rest (after "--"). Runs as femd, before any task code.
_ENTER: Final = (
    'for f; do shift; [ "$f" = -- ] && exec "$@"; '
    'echo $$ > "$f" || exit 125; done; exit 125'  # 125: capture.STEP_FAILED
)
_TMP: Final = "/tmp"  # noqa: S108 (inside the sandbox: a private tmpfs)
_SHM: Final = "/dev/shm"  # noqa: S108 (inside the sandbox: a private tmpfs)
# Namespaces every sandbox gets (bwrap always adds a mount namespace). No uts
# namespace: the task sees the host's hostname and cannot change it (it holds
# no capability over the host's UTS namespace; under femd.service,
# ProtectHostname= also forbids sethostname), and bwrap's --hostname would be
# refused there. No cgroup namespace: /proc/self/cgroup shows femd's cgroup path.
_NAMESPACES: Final = ("--unshare-user", "--unshare-ipc", "--unshare-pid")

# Syscalls the built-in filter refuses with EPERM, numbered (x86_64, aarch64) as
# in the kernel's unistd headers: kernel interfaces a task never needs (keyrings
# are not namespaced, ptrace and process_vm_* reach other processes, mount APIs,
# modules, kexec...), io_uring (its requests bypass this filter), and what
# containers-common's default seccomp.json denies to a container without
# capabilities (clock setting, vmsplice, page migration, obsolete calls...).
_DENY: Final[dict[str, tuple[int | None, int | None]]] = {
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "perf_event_open": (298, 241), "bpf": (321, 280), "userfaultfd": (323, 282),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "swapon": (167, 224),
    "swapoff": (168, 225), "reboot": (169, 142), "syslog": (103, 116),
    "acct": (163, 89), "quotactl": (179, 60), "quotactl_fd": (443, 443),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "open_tree": (428, 428), "move_mount": (429, 429),
    "mount_setattr": (442, 442), "iopl": (172, None), "ioperm": (173, None),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "io_pgetevents": (333, 292),
    "vmsplice": (278, 75), "migrate_pages": (256, 238), "move_pages": (279, 239),
    "kcmp": (312, 272), "process_madvise": (440, 440), "lookup_dcookie": (212, 18),
    "fanotify_init": (300, 262), "clock_settime": (227, 112),
    "settimeofday": (164, 170), "sethostname": (170, 161),
    "setdomainname": (171, 162), "vhangup": (153, 58), "nfsservctl": (180, 42),
    "uselib": (134, None), "ustat": (136, None), "sysfs": (139, None),
    "_sysctl": (156, None), "create_module": (174, None),
    "get_kernel_syms": (177, None), "query_module": (178, None),
}  # fmt: skip
_ARCHES: Final = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The built-in seccomp program (classic BPF) for *machine*, or None.

    Any other ABI than the native one (i386 via ``int 0x80``, x32) is refused
    entirely, so the denied numbers cannot be reached under another numbering.
    """
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return None
    column, audit_arch = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM
    nrs = sorted({nr for n in _DENY.values() if (nr := n[column]) is not None})
    # SECURITY: a foreign AUDIT_ARCH or the x32 bit would renumber the calls.
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny), (ld, 0, 0, 0)]
    prog.append((jge, len(nrs) + 1, 0, 0x40000000))  # x32 ABI bit
    prog += [(jeq, len(nrs) - i, 0, nr) for i, nr in enumerate(nrs)]
    prog += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def _children(pid: int) -> set[int]:
    """Every live descendant of *pid* (via /proc), not *pid* itself."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parent[int(entry.name)] = _parent(int(entry.name))
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - found
        found |= frontier
    return found


class _TaskUser(msgspec.Struct, frozen=True):
    uid: int
    gid: int
    switch: bool  # femd is root: drop to this user


class BubblewrapLauncher:
    """Runs a task as an unprivileged process in a bubblewrap sandbox."""

    name: ClassVar[str] = "process"

    def __init__(self, profile: LauncherProfile, *, state_dir: Path) -> None:
        """Keep the profile; logs go under ``state_dir/launchers/process``."""
        self._profile = profile
        self._log_dir = state_dir / "launchers" / "process"
        self._caps: Capabilities | None = None
        self._cgroups: CgroupHost | None = None
        self._scope = scope_of(state_dir)

    # -- probe ---------------------------------------------------------------

    def probe(self) -> Capabilities:
        """Find what this host can enforce, running a real (empty) sandbox.

        ``start()`` probes before every launch, so an available result is
        reused (a reload builds a new launcher, hence probes afresh): a smoke
        sandbox per task doubled the sandboxes. The smoke runs in a cgroup of
        its own, entered like a task's: a host whose cgroups cannot be made or
        entered enforces no memory, pids or cpu limit (every task is refused).
        """
        if self._caps is not None and self._caps.available:
            return self._caps
        problems: list[str] = []
        settings = self._profile.process
        user = None
        try:
            user = self._task_user()
        except LauncherUnavailableError as e:
            problems.append(str(e))
        tools = [*_TOOLS, "setpriv"] if user is not None and user.switch else _TOOLS
        found = {t: shutil.which(t, path=_HOST_PATH) for t in tools}
        if settings is None:
            problems.append(f"profile {self._profile.name!r} has no process section")
        problems += [f"{t} is not installed" for t, path in found.items() if not path]
        cgroups = self._cgroups = detect()
        limits = list(cgroups.problems)
        if not problems and settings is not None and user is not None:
            smoke, cgroup_problem = self._smoke(settings, user, cgroups)
            problems += smoke
            limits += cgroup_problem
        seccomp = seccomp_filter() is not None
        enforced = cgroups.kind != "none" and not limits
        how = cgroups.enforced if enforced else "none"
        net = None
        if not self._profile.network.enabled:
            net = f"profile {self._profile.name!r} gives tasks no network"
        elif not problems and user is not None:
            net = probe_join(user.uid if user.switch else None)
        elif problems:
            net = "the sandbox itself does not work"
        caps = Capabilities(
            launcher=self.name,
            available=not problems,
            problems=tuple(problems)
            + tuple(limits)
            + (() if seccomp else (f"no seccomp filter for {platform.machine()}",))
            + (() if net is None else (f"egress and ingress: {net}",)),
            memory_limit=enforced,
            cpu_limit=enforced,
            pids_limit=enforced,
            egress=net is None,
            egress_filtered=net is None,
            ingress=net is None,
            min_cpus=0.01,
            notes=(
                "memory: the task's cgroup (anonymous, page cache, tmpfs, memfd, "
                "shm; swap off), OOM kills inside it",
                "cpus: a CFS quota of the task's cgroup (fractions work)",
                "pids: the task's cgroup, per task",
                "outputs: a tmpfs of the output cap, charged to the task's memory",
                "network: own empty namespace; femd forwards allowed egress "
                "and ingress (TCP only)",
            ),
            enforcement=(
                ("memory", how),
                ("pids", how),
                ("cpus", how),
                ("outputs", f"tmpfs of the cap ({how})"),
                ("time", "wall-clock timeout, kills the task's cgroup"),
            ),
        )
        self._caps = caps
        return caps

    def _task_user(self) -> _TaskUser:
        if os.geteuid() != 0:
            return _TaskUser(uid=os.getuid(), gid=os.getgid(), switch=False)
        name = self._profile.process.run_as if self._profile.process else "femd-task"
        try:
            entry = pwd.getpwnam(name)
        except KeyError as e:
            raise LauncherUnavailableError(
                f"process: task user {name!r} does not exist (femd runs as root)"
            ) from e
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise LauncherUnavailableError(f"process: task user {name!r} is root")
        return _TaskUser(uid=entry.pw_uid, gid=entry.pw_gid, switch=True)

    def _smoke(
        self, settings: ProcessSettings, user: _TaskUser, cgroups: CgroupHost
    ) -> tuple[list[str], list[str]]:
        """Run ``true`` in a sandbox like a task's, in a cgroup like a task's.

        Returns the sandbox's problems and the cgroup's (a host whose cgroups
        cannot be made still runs sandboxes, but refuses every task).
        """
        cgroup = None
        if cgroups.kind != "none":
            cgroup = TaskCgroup(cgroups, f"femd-probe-{os.getpid()}")
            cgroup.kill()
            cgroup.remove()
            try:
                cgroup.create(CgroupLimits(memory_bytes=256 << 20, pids=64, cpus=1))
            except OSError as e:
                return [], [f"no memory, pids or cpu cgroup can be made: {cut(e)}"]
        memfd = self._seccomp_fd()
        try:
            # The output step's tools (capture) must be in the sandbox too.
            needs = "command -v stat >/dev/null && command -v tar >/dev/null"
            args = self._bwrap_args(settings, None, memfd, ["/bin/sh", "-c", needs])
            # Entered like a task: a host or unit that refuses the cgroup
            # write, prlimit64 or setpriv fails here, not at a task's launch.
            prefix = self._prefix(settings, None, user, cgroup)
            result = subprocess.run(  # noqa: S603 (fixed tools, no shell)
                prefix + args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
                env={"PATH": _HOST_PATH},
                pass_fds=(memfd,) if memfd is not None else (),
            )
        except (OSError, subprocess.SubprocessError) as e:
            return [f"bubblewrap cannot run: {cut(e)}"], []
        finally:
            if memfd is not None:
                os.close(memfd)
            if cgroup is not None:
                cgroup.kill()
                cgroup.remove()
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").splitlines()
            # The last line that says something is bwrap's error, cause last.
            said = [line.strip() for line in lines if line.strip()]
            why = (
                cut(said[-1], 200, keep_end=True)
                if said
                else "/bin/sh, stat or tar missing (ro_binds)"
            )
            return [f"bubblewrap cannot create a sandbox: {why}"], []
        return [], []

    # -- command line ----------------------------------------------------------

    @staticmethod
    def _seccomp_fd() -> int | None:
        program = seccomp_filter()
        if program is None:
            return None
        fd = os.memfd_create("femd-seccomp", os.MFD_CLOEXEC)
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def _prefix(
        self,
        settings: ProcessSettings,
        spec: LaunchSpec | None,
        user: _TaskUser,
        cgroup: TaskCgroup | None,
    ) -> list[str]:
        """``sh`` (enter the cgroup) ``prlimit ... [setpriv ...] --``."""
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
        cmd = [shutil.which("sh", path=_HOST_PATH) or "/bin/sh", "-c", _ENTER]
        cmd += ["femd-enter", *procs, "--"]
        cmd.append(shutil.which("prlimit", path=_HOST_PATH) or "prlimit")
        cmd += [f"--{k}={v}:{v + 5 if k == 'cpu' else v}" for k, v in limits.items()]
        cmd.append("--")
        if user.switch:
            # SECURITY: tasks never run as root: no supplementary groups, then
            # gid, then uid (setpriv, util-linux), after the cgroup write.
            setpriv = shutil.which("setpriv", path=_HOST_PATH) or "setpriv"
            cmd += [setpriv, f"--regid={user.gid}", f"--reuid={user.uid}"]
            cmd += ["--clear-groups", "--"]
        return cmd

    def _bwrap_args(
        self,
        settings: ProcessSettings,
        spec: LaunchSpec | None,
        seccomp_fd: int | None,
        argv: list[str],
        status_fd: int | None = None,
        extra_seccomp_fd: int | None = None,
        net: tuple[list[tuple[str, str]], int] | None = None,
    ) -> list[str]:
        tmp = str(settings.tmp_size_mb << 20)
        args = [shutil.which("bwrap", path=_HOST_PATH) or "bwrap"]
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

    # -- launch ----------------------------------------------------------------

    def adopt(self, task_id: TaskId) -> None:
        """Kill whatever *task_id* left in its cgroup; nothing is re-attached.

        A sandbox dies with the agent (``--die-with-parent``), but not one
        stuck in bwrap's setup handshake, nor what it forked meanwhile: they
        are all in the task's cgroup, which goes with them.
        """
        host = self._cgroups if self._cgroups is not None else detect()
        if host.kind == "none":
            return
        cgroup = TaskCgroup.of_task(host, task_id, self._scope)
        if not cgroup.exists():
            return
        left = len(cgroup.pids())
        emptied = cgroup.kill()
        cgroup.remove()
        logger.info(
            "process: task %s: killed %d processes left after a restart%s",
            task_id,
            left,
            "" if emptied else " (some did not die)",
        )

    def launch(self, spec: LaunchSpec) -> _ProcessHandle:
        """Start *spec* in a new sandbox.

        Raises:
            UnenforceableError: a limit cannot be enforced here.
            LauncherUnavailableError: bubblewrap or the task user is missing.
            LaunchError: the spec is malformed or the sandbox did not start.
        """
        caps = self._caps or self.probe()
        if not caps.available:
            raise LauncherUnavailableError(
                "process: not available: " + cut("; ".join(caps.problems), 200)
            )
        if spec.launcher != self.name or self._profile.process is None:
            raise LaunchError(f"process: task {spec.task_id} is not for this launcher")
        if spec.profile != self._profile:
            # A launcher serves the one profile it was built (and probed) with.
            raise LaunchError(
                f"process: task {spec.task_id} names profile {spec.profile.name!r}, "
                f"this launcher serves {self._profile.name!r}"
            )
        reasons = unenforceable(spec, caps)
        if reasons:
            raise UnenforceableError("; ".join(r.message for r in reasons))
        settings = self._profile.process
        self._check(spec, settings)
        user = self._task_user()
        self._prepare_output(spec)
        net = TaskNetwork(spec, self._profile.network) if spec.network else None
        cgroup = self._cgroup(spec)
        binds = net.prepare() if net else None
        log = self._log_dir / f"{spec.task_id}.log"
        handle = _ProcessHandle(spec, log, cgroup, net, binds)
        handle.start(self, settings, user)
        return handle

    def _cgroup(self, spec: LaunchSpec) -> TaskCgroup:
        if self._cgroups is None or self._cgroups.kind == "none":
            raise UnenforceableError(
                f"task {spec.task_id}: no per-task cgroup on this host"
            )
        cgroup = TaskCgroup.of_task(self._cgroups, spec.task_id, self._scope)
        if cgroup.exists():  # left by a launch the agent did not see through
            cgroup.kill()
            cgroup.remove()
        limits = CgroupLimits(
            memory_bytes=spec.limits.memory_mb << 20,
            pids=spec.limits.pids,
            cpus=spec.limits.cpus,
        )
        try:
            cgroup.create(limits)
        except OSError as e:
            raise LaunchError(
                f"process: cannot create the cgroup of task {spec.task_id}: {cut(e)}"
            ) from e
        return cgroup

    def _check(self, spec: LaunchSpec, settings: ProcessSettings) -> None:
        try:
            msgspec.convert(msgspec.to_builtins(spec), LaunchSpec, strict=True)
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

    @staticmethod
    def _prepare_output(spec: LaunchSpec) -> None:
        """Check the host output directory is empty; femd alone writes it."""
        try:
            fd = os.open(spec.output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            raise LaunchError(
                f"process: output dir {cut(spec.output_dir)!r}: {e}"
            ) from e
        try:
            if os.listdir(fd):
                raise LaunchError(
                    f"process: output dir {cut(spec.output_dir)!r} is not empty"
                )
            os.fchmod(fd, 0o700)
        except OSError as e:
            raise LaunchError(f"process: cannot prepare output dir: {cut(e)}") from e
        finally:
            os.close(fd)


class _ProcessHandle:
    """One sandbox: a monitor thread spawns it, pumps its log, enforces time."""

    def __init__(
        self,
        spec: LaunchSpec,
        log_path: Path,
        cgroup: TaskCgroup,
        net: TaskNetwork | None = None,
        net_binds: list[tuple[str, str]] | None = None,
    ) -> None:
        self.task_id: TaskId = spec.task_id
        self._spec = spec
        self._cgroup = cgroup
        self._capture: OutputCapture | None = None
        self._mono_start = time.monotonic()
        self._net = net
        self._net_binds = net_binds or []
        self._block_w: int | None = None  # holds the command until attached
        self._net_error: str | None = None
        self._log_path = log_path
        self._tail = bytearray()
        self._done = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._outcome: Outcome | None = None
        self._cancel_at: float | None = None
        self._pidfd: int | None = None
        self._pid1 = 0
        self._pidfd_lock = threading.Lock()  # cancel() races the monitor's close
        self._popen: subprocess.Popen[bytes] | None = None
        self._started_at = _now()

    def start(
        self,
        launcher: BubblewrapLauncher,
        settings: ProcessSettings,
        user: _TaskUser,
    ) -> None:
        # The monitor thread owns the child: PR_SET_PDEATHSIG fires when the
        # *thread* that forked bwrap ends, so it must live as long as the task.
        thread = threading.Thread(
            target=self._run,
            args=(launcher, settings, user),
            name=f"femd-process-{self.task_id}",
            daemon=True,
        )
        thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise LaunchError(
                f"process: cannot start task {self.task_id}: {cut(self._start_error)}"
            ) from self._start_error

    def _spawn(
        self,
        launcher: BubblewrapLauncher,
        settings: ProcessSettings,
        user: _TaskUser,
    ) -> tuple[int, int, int]:
        self._log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        log_fd = os.open(self._log_path, flags, 0o600)
        log_r, log_w = os.pipe()
        status_r, status_w = os.pipe()
        out_r, out_w = os.pipe()
        fds: list[int | None] = [launcher._seccomp_fd(), status_w, None, None]
        if settings.seccomp is not None:
            fds[2] = os.open(settings.seccomp, os.O_RDONLY | os.O_CLOEXEC)
        net = None
        if self._net is not None:
            block_r, self._block_w = os.pipe()
            fds[3], net = block_r, (self._net_binds, block_r)
        try:
            spec = self._spec
            argv = wrap_argv(list(spec.argv), spec.output_target)
            args = launcher._bwrap_args(
                settings, spec, fds[0], argv, status_w, fds[2], net
            )
            prefix = launcher._prefix(settings, spec, user, self._cgroup)
            self._popen = subprocess.Popen(  # noqa: S603 (fixed tools, no shell)
                prefix + args,
                stdin=out_w,  # the output stream (see capture)
                stdout=log_w,
                stderr=log_w,
                pass_fds=tuple(fd for fd in fds if fd is not None),
                env={"PATH": _HOST_PATH},
                cwd="/",
                umask=0o077,
                process_group=0,
            )
        except BaseException:
            for fd in (log_fd, log_r, status_r, out_r):
                os.close(fd)
            raise
        finally:
            for closing in (log_w, out_w, *fds):
                if closing is not None:
                    os.close(closing)
        self._capture = OutputCapture(
            out_r, Path(self._spec.output_dir), self._spec.output_max_bytes
        )
        return log_fd, log_r, status_r

    def _end_network(self) -> None:
        """Close the task's ports and forwarders; the traffic goes in the outcome."""
        if self._block_w is not None:
            self._kill()  # never released: the command must not run unforwarded
            os.close(self._block_w)
            self._block_w = None
        if self._net is None:
            return
        traffic = self._net.close()
        if self._outcome is None:
            return
        changes: dict[str, object] = {"traffic": traffic}
        if self._net_error is not None:
            changes |= {"state": "failed", "exit_code": None, "reason": self._net_error}
        self._outcome = msgspec.structs.replace(self._outcome, **changes)

    def _run(
        self,
        launcher: BubblewrapLauncher,
        settings: ProcessSettings,
        user: _TaskUser,
    ) -> None:
        try:
            log_fd, log_r, status_r = self._spawn(launcher, settings, user)
        except BaseException as e:  # noqa: BLE001 (handed to the launching thread)
            self._cgroup.kill()
            self._cgroup.remove()
            self._start_error = e
            self._end_network()
            self._started.set()
            return
        self._started_at = _now()
        self._mono_start = time.monotonic()
        logger.info("process: task %s started in %s", self.task_id, self._cgroup.name)
        self._started.set()
        try:
            self._outcome = self._monitor(log_fd, log_r, status_r)
        except Exception as e:
            # Never leave a sandbox behind, and never leave wait() hanging.
            logger.exception("process: monitoring task %s failed", self.task_id)
            self._kill()
            if self._popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._popen.wait(timeout=10)
            self._outcome = Outcome(
                state="failed",
                exit_code=None,
                started_at=self._started_at,
                finished_at=_now(),
                log_tail=self._tail.decode(errors="replace"),
                reason=f"launcher error: {cut(e)}",
            )
            self._cgroup.kill()
        finally:
            self._end_network()
            self._cgroup.remove()
            for fd in (log_fd, log_r, status_r):
                os.close(fd)
            with self._pidfd_lock:
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
            self._done.set()

    def _monitor(self, log_fd: int, log_r: int, status_r: int) -> Outcome:
        assert self._popen is not None  # noqa: S101 (set by _spawn)
        deadline = time.monotonic() + self._spec.limits.timeout_s
        status, written, timed_out, killed = b"", 0, False, False
        drain_until: float | None = None
        sel = selectors.DefaultSelector()
        sel.register(log_r, selectors.EVENT_READ)
        sel.register(status_r, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            self._cgroup.sample()
            timed_out = timed_out or now >= deadline
            cancelled = self._cancel_at is not None and now >= self._cancel_at
            if (timed_out or cancelled) and not killed:
                killed = True
                self._kill()
            if drain_until is None and self._popen.poll() is not None:
                drain_until = now + 5  # bwrap is gone: read what is left, then stop
            elif drain_until is not None and now >= drain_until:
                self._kill()
                break
            for key, _ in sel.select(timeout=0.1):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                elif key.fd == status_r:
                    status += data
                    self._pin(status)
                    self._attach_network()
                else:
                    written += self._log(log_fd, data, written)
        sel.close()
        self._popen.wait(timeout=10)
        # SECURITY: nothing of the task outlives it (double-forked, setsid'd,
        # or a sandbox stuck in bwrap's setup): the whole cgroup goes.
        if not self._cgroup.kill():
            logger.error("process: task %s: processes left in its cgroup", self.task_id)
        assert self._capture is not None  # noqa: S101 (set by _spawn)
        if not self._capture.join(30):
            logger.error("process: task %s: output stream did not end", self.task_id)
        return self._result(status, timed_out)

    def _attach_network(self) -> None:
        """Start the task's forwarders in its namespace, then let it run."""
        if self._block_w is None or self._net is None or self._pidfd is None:
            return
        block_w, self._block_w = self._block_w, None
        assert self._popen is not None  # noqa: S101 (set by _spawn)
        try:
            fd = os.open(f"/proc/{self._pid1}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                # SECURITY: still the sandbox pinned by _pin, not a reused pid.
                if _parent(self._pid1) != self._popen.pid:
                    raise LaunchError("network: the sandbox ended before it ran")
                self._net.attach(fd)
            finally:
                os.close(fd)
            os.write(block_w, b"x")
        except (LaunchError, OSError, ValueError, IndexError) as e:
            self._net_error = cut(e, 200)
            logger.error("process: task %s: %s", self.task_id, self._net_error)
            self._kill()
        finally:
            os.close(block_w)

    def _log(self, log_fd: int, data: bytes, written: int) -> int:
        self._tail += data
        del self._tail[:-_TAIL_BYTES]
        limit = self._spec.log_max_bytes
        if written >= limit:
            return 0
        chunk = data[: limit - written]
        os.write(log_fd, chunk)
        if len(chunk) < len(data):
            os.write(log_fd, f"\n[femd: log cut at {limit} bytes]\n".encode())
        return len(data)

    def _pin(self, status: bytes) -> None:
        """Hold a pidfd on the sandbox's PID 1 as soon as bwrap reports it."""
        if self._pidfd is not None or b"\n" not in status:
            return
        pid = int(json.loads(status.split(b"\n", 1)[0])["child-pid"])
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # already over (and reaped): nothing left to signal
        assert self._popen is not None  # noqa: S101
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _parent(pid) == self._popen.pid:  # else: reused before we pinned
                with self._pidfd_lock:
                    self._pidfd, self._pid1 = fd, pid
                return
        os.close(fd)

    def _signal_sandbox(self, sig: int) -> None:
        """Send *sig* to every process in the sandbox (below its PID 1)."""
        with self._pidfd_lock:
            if self._pidfd is None:
                return
            tree = _children(self._pid1) | {self._pid1}
            for child in tree - {self._pid1}:
                try:
                    fd = os.pidfd_open(child)
                except OSError:
                    continue  # already gone
                # SECURITY: the pidfd pins the process; re-check it is still in
                # the sandbox's tree, so a reused pid is never signalled.
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if _parent(child) in tree:
                        signal.pidfd_send_signal(fd, sig)
                os.close(fd)

    def _kill(self) -> None:
        """Kill the whole task: every process of its cgroup, bwrap included."""
        self._cgroup.kill()
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    def _result(self, status: bytes, timed_out: bool) -> Outcome:
        assert self._popen is not None  # noqa: S101
        assert self._capture is not None  # noqa: S101
        # bwrap writes "exit-code" only when the task ran; the code itself is
        # taken from bwrap's own exit status, which the task cannot forge.
        exited = any(b'"exit-code"' in line for line in status.splitlines())
        returncode = self._popen.returncode
        code = returncode if exited and returncode >= 0 else None
        tail = self._tail.decode(errors="replace")
        limits, capture = self._spec.limits, self._capture
        state, reason, rule = "failed", "", ""
        if timed_out:
            state, reason = "timed_out", f"timeout of {limits.timeout_s} s reached"
        elif self._cancel_at is not None:
            state, reason = "cancelled", "cancelled"
        elif self._cgroup.oom_killed():
            reason = (
                f"memory limit of {limits.memory_mb} MB reached: killed by the "
                "kernel's OOM killer in the task's cgroup"
            )
        elif capture.full:
            rule = "outputs.exceeded"
            reason = capture.full_reason(self._spec.output_max_bytes)
        elif code is None:
            reason = f"sandbox setup failed (bwrap exit {returncode})"
        elif capture.step_failure(code):
            reason = capture.step_failure(code)
        elif code != 0:
            reason = f"exit code {code}"
            if 128 < code < 128 + signal.NSIG:
                reason += f" (killed by {signal.Signals(code - 128).name})"
        elif capture.incomplete_reason():
            reason = capture.incomplete_reason()
        else:
            state = "succeeded"
        usage = msgspec.structs.replace(
            self._cgroup.usage(),
            output_bytes=capture.bytes,
            wall_s=round(time.monotonic() - self._mono_start, 3),
        )
        logger.info("process: task %s %s %s", self.task_id, state, reason)
        return Outcome(
            state=state,  # type: ignore[arg-type]
            exit_code=code,
            started_at=self._started_at,
            finished_at=_now(),
            log_tail=tail,
            reason=reason,
            rule=rule,
            usage=usage,
        )

    # -- Handle ----------------------------------------------------------------

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        """The outcome, or None if the task still runs after *timeout_s*."""
        self._done.wait(timeout_s)
        return self._outcome if self._done.is_set() else None

    def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM every task process now, SIGKILL the sandbox after *grace_s*."""
        if self._done.is_set() or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic() + max(0.0, grace_s)
        self._signal_sandbox(signal.SIGTERM)

    def logs(self) -> Iterator[bytes]:
        """The captured stdout+stderr (at most ``log_max_bytes`` and a marker)."""
        try:
            with self._log_path.open("rb") as f:
                while chunk := f.read(65536):
                    yield chunk
        except OSError as e:
            raise LaunchError(f"process: cannot read log of {self.task_id}: {e}") from e
